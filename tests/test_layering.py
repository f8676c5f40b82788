"""The package layout holds: no import circle between modules (type-only and function-local
imports count), and every import points down the layers a newcomer reads in docs/architecture.md:

    commands (train, evaluate, soup, the bench_* measurements)
      results (reads runs and sweeps)
        sweep
          trainer
            observe
              config             composes the sections of every component
                methods
                  models, data   (data_prep below them)
                    core         imports nothing of rsc_dist

A component's config section is a leaf (``<package>/settings.py``, a method's in its own file):
config.py imports it from below, so it may import only what sits below config.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The commands a user runs (python -m rsc_dist.<name>): the top layer, and the only top-level
# modules beside config.
COMMANDS = {"train", "evaluate", "bench", "bench_input", "bench_methods", "bench_averaging", "soup"}
LAYERS = {  # the higher the number, the higher the layer
    "rsc_dist.core": 0, "data_prep": 0,
    "rsc_dist.data": 1, "rsc_dist.models": 1,
    "rsc_dist.methods": 2, "rsc_dist.averaging": 2,
    "rsc_dist.config": 3,
    "rsc_dist.observe": 4,
    "rsc_dist.trainer": 5,
    "rsc_dist.sweep": 6, "rsc_dist.results": 7,
    **{f"rsc_dist.{command}": 8 for command in COMMANDS},
}
SETTINGS_LAYER = 2.5  # settings modules sit just below config, whatever their package


def _modules() -> dict[str, Path]:
    found = {}
    for root in ("rsc_dist", "data_prep"):
        for path in sorted((REPO / root).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every project module ``module`` imports, anywhere in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {module: _imports(module, path, known) for module, path in modules.items()}


def _layer(module: str) -> float:
    if module.rpartition(".")[2] == "settings":
        return SETTINGS_LAYER
    best = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    assert best is not None, f"{module} belongs to no layer: add its package to LAYERS (and docs/architecture.md)"
    return best[1]


def test_no_import_circles():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # A package's __init__ that imports its own modules is not a circle through them.
    real = [c for c in cycles if not any(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not real, "import circles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_every_import_points_down_the_layers():
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            package = module.rpartition(".")[0]
            if target in (package, f"{package}.settings") or module.startswith(target + "."):
                continue  # a module and its own package, or the section its package owns
            if _layer(target) > _layer(module):
                upward.append(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})")
    assert not upward, "imports that point up:\n" + "\n".join(sorted(upward))


def test_settings_modules_are_leaves():
    """A section is imported by config.py: it must not import what imports config."""
    graph = _graph()
    for module, targets in graph.items():
        if module.rpartition(".")[2] == "settings":
            assert all(_layer(t) < SETTINGS_LAYER for t in targets), (module, targets)


def test_the_top_level_holds_only_commands_and_the_config():
    top = {p.stem for p in (REPO / "rsc_dist").glob("*.py")} - {"__init__"}
    assert top <= COMMANDS | {"config"}, top
