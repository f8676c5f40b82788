"""What a sweep knows about its dataset before anything runs: the domains and classes of the
shards its preset reads (data.root's _info.json, or the built-in demo set's), so a misspelled
target or class list stops the sweep at once instead of failing every run at its start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rsc_dist.core.errors import UsageError


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # the manifest's dataset name (data.dataset when set)
    domains: tuple[str, ...]  # in the manifest's order
    classes: tuple[str, ...]
    source: str  # where it was read, for messages


def read_dataset(config) -> DatasetInfo | str:
    """The dataset of ``config``'s data.root, or the reason it cannot be read here (a string:
    no manifest at that path on this machine). A manifest that exists but is broken is an error."""
    root = config.data.root
    if root == "demo":  # generated on first use: its domains and classes are the generator's
        from data_prep.synth import DOMAINS
        from data_prep.synth_shapes import CLASSES

        return DatasetInfo(config.data.dataset or "demo", tuple(sorted(DOMAINS)), tuple(CLASSES), "the demo dataset")
    from data_prep.manifest import MANIFEST_NAME, ManifestError, load_manifest

    path = Path(root).expanduser()
    if not (path / MANIFEST_NAME).is_file():
        return f"data.root={root} has no {MANIFEST_NAME} on this machine"
    try:
        manifest = load_manifest(path)
    except ManifestError as exc:
        raise UsageError(f"data.root={root}: {exc}") from None
    return DatasetInfo(config.data.dataset or manifest.dataset, tuple(manifest.domains), tuple(manifest.classes),
                       str(path / MANIFEST_NAME))


def dataset_problems(info: DatasetInfo, config, targets: list[str]) -> list[str]:
    """What the sweep asks of the dataset that it does not have: target or source domains,
    the class list a preset pins (data.classes)."""
    problems = []
    unknown = [t for t in targets if t not in info.domains]
    if unknown:
        problems.append(f"targets {unknown} are not domains of {info.source}, which has {list(info.domains)}")
    sources = [s for s in config.data.sources if s not in info.domains]
    if sources:
        problems.append(f"data.sources {sources} are not domains of {info.source} ({list(info.domains)})")
    if config.data.classes and tuple(config.data.classes) != info.classes:
        problems.append(f"data.classes {list(config.data.classes)} differs from the classes of {info.source}: "
                        f"{list(info.classes)}")
    return problems
