"""The sweep file and its deterministic expansion into runs.

    name: pacs_r18_search          # default: the file's name without .yaml
    preset: pacs_resnet18          # a preset name, or a YAML path (relative to this file)
    methods: [erm, rsc]
    targets: [art_painting, cartoon, photo, sketch]   # default: the preset's own target
    seeds: [0, 1, 2]               # trial seeds (run.seed)
    overrides:                     # fixed settings of every run
      data.root: /shared/shards/pacs
    default_space: true            # start from the per-method registry (space.default_space)
    space:                         # every method; replaces registry entries of the same field
      optim.weight_decay: [0.0, 5.0e-4]            # a list: a grid axis
      optim.lr: {log_uniform: [1.0e-3, 1.0e-1]}     # a distribution: random search
    method_space:                  # one method only; replaces the entries above
      rsc: {rsc.p_batch: {choice: [0.25, 0.33]}}
    shared_init: runs/lp/erm/sketch/seed0-XXXX   # every run starts from this run's weights
                                   # (model.pretrained; DiWA's shared start, so that
                                   # python -m rsc_dist.soup can average the runs)
    n_trials: 8                    # random draws (per grid point); needed with a distribution
    search_seed: 0                 # seeds the draws
    slurm: {sbatch: [--gpus-per-node=1, --time=8:00:00], max_parallel: 16}

Runs are methods x targets x trials x seeds, in that order; run K of the list is always the
same run. A trial is one hyperparameter setting; its values are shared by every target and
seed (so a setting has a mean over seeds), and draw k is the same for every method. `rsc.*`
fields are left out of ERM's space (ERM never reads them), so ERM may have fewer trials. Each run has a stable name
METHOD-TARGET-tTT-sS and folder OUT/METHOD/TARGET/tTT-sS.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass
from pathlib import Path

import yaml

from rsc_dist import methods
from rsc_dist.config import Config, ConfigError, describe_fields, flatten, load_config, to_dict
from rsc_dist.sweep.space import Distribution, SpaceError, default_space, parse_entry, unit

KEYS = ("name", "preset", "methods", "targets", "seeds", "overrides", "default_space", "space",
        "method_space", "n_trials", "search_seed", "slurm", "shared_init")
SLURM_KEYS = ("sbatch", "max_parallel")
METHODS = methods.NAMES
# Set by the sweep for each run: written in methods/targets/seeds, or by the launcher.
RESERVED = {"algorithm": "methods", "data.target": "targets", "run.seed": "seeds",
            "run.output_dir": "the launcher (--out)", "run.name": "the sweep (the run's name)"}


class SweepError(ValueError):
    """A sweep file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class RunSpec:
    index: int  # place in the expansion
    name: str  # METHOD-TARGET-tTT-sS
    relative: Path  # METHOD/TARGET/tTT-sS, under the sweep's output folder
    method: str
    target: str | None  # None: the preset's own target
    seed: int
    trial: int
    hparams: dict  # the trial's searched values {field: value}
    overrides: tuple[str, ...]  # the trainer's overrides, --key=value
    preset: str

    def config(self) -> Config:
        """The config the trainer will resolve for this run."""
        return _resolve(self.preset, list(self.overrides), f"run {self.name}")

    def trainer_args(self, preset: str, out: Path) -> list[str]:
        return ["--config", preset, *self.overrides, "--output_dir", str(out / self.relative), "--resume", "auto"]

    def describe_hparams(self) -> str:
        return " ".join(f"{k}={_short(v)}" for k, v in self.hparams.items()) or "(preset values)"


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    preset: str  # a preset name, or an absolute path
    runs: list[RunSpec]
    slurm: dict  # sbatch: [options], max_parallel: int | None
    n_trials: dict[str, int]  # trials per method

    def default_out(self) -> Path:
        return Path("runs") / self.name


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cli_value(value) -> str:
    """A value as the trainer's override parser (YAML) reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(cli_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def config_fields() -> set[str]:
    return {flag[2:] for flag, _, _ in describe_fields()} | {"algorithm"}


def _unknown(what: str, name, known, otherwise: str) -> SweepError:
    close = difflib.get_close_matches(str(name), sorted(known), n=1)
    return SweepError(f"{what} {name!r}" + (f"; did you mean {close[0]}?" if close else f"; {otherwise}"))


def _check_field(name: str, where: str, known: set[str]) -> None:
    if not isinstance(name, str) or name not in known:
        raise _unknown(f"{where}: unknown config field", name, known, "`python -m rsc_dist.train --help` lists them")
    if name in RESERVED:
        raise SweepError(f"{where}: {name} is set by {RESERVED[name]}, not here")


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{where} must be a mapping of config fields (data.root: ...); got {value!r}")
    return value


def _int_list(value, where: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise SweepError(f"{where} must be a list of non-negative integers; got {value!r}")
    if len(set(values)) != len(values):
        raise SweepError(f"{where} lists a value twice: {value!r}")
    return values


def load_sweep(path: Path | str, extra_overrides: dict | None = None) -> Sweep:
    """Read, validate and expand a sweep file. ``extra_overrides`` ({field: value}, e.g. from
    --set on the command line) are added to the file's `overrides`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SweepError(f"{path}: cannot read the sweep file: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a mapping (preset:, methods:, ...)")
    for key in raw:
        if key not in KEYS:
            raise _unknown(f"{path}: unknown key", key, KEYS, f"known: {', '.join(KEYS)}")
    return _expand(path, raw, extra_overrides or {})


def _expand(path: Path, raw: dict, extra_overrides: dict) -> Sweep:
    where = str(path)
    name = str(raw.get("name") or path.stem)
    if not name.replace("-", "").replace("_", "").replace(".", "").replace("+", "").isalnum():
        raise SweepError(f"{where}: name {name!r} may only hold letters, digits and _ . + -")
    if "preset" not in raw:
        raise SweepError(f"{where}: missing key 'preset' (a preset name such as pacs_resnet18, or a YAML path)")
    preset = str(raw["preset"])
    if preset.endswith((".yaml", ".yml")):  # a file: beside the sweep file, else from here; absolute
        beside = path.parent / preset      # so every launcher's trainer finds it from any directory
        preset = str((beside if beside.is_file() else Path(preset)).resolve())
    methods = raw.get("methods", ["rsc"])
    methods = methods if isinstance(methods, list) else [methods]
    for method in methods:
        if method not in METHODS:
            raise SweepError(f"{where}: methods: {method!r} is not one of {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise SweepError(f"{where}: methods lists a method twice: {methods!r}")
    targets = raw.get("targets")
    if targets is None:
        targets = [None]
    else:
        targets = targets if isinstance(targets, list) else [targets]
        if not targets or not all(isinstance(t, str) and t for t in targets) or len(set(targets)) != len(targets):
            raise SweepError(f"{where}: targets must be a list of distinct domain names; got {raw['targets']!r}")
    seeds = _int_list(raw.get("seeds", [0]), f"{where}: seeds")
    n_trials = raw.get("n_trials")
    if n_trials is not None and not (isinstance(n_trials, int) and not isinstance(n_trials, bool) and n_trials >= 1):
        raise SweepError(f"{where}: n_trials must be a positive integer; got {n_trials!r}")
    search_seed = raw.get("search_seed", 0)
    if not isinstance(search_seed, int) or isinstance(search_seed, bool):
        raise SweepError(f"{where}: search_seed must be an integer; got {search_seed!r}")
    use_defaults = raw.get("default_space", False)
    if not isinstance(use_defaults, bool):
        raise SweepError(f"{where}: default_space must be true or false; got {use_defaults!r}")

    known = config_fields()
    fixed = dict(_mapping(raw.get("overrides"), f"{where}: overrides"))
    for key in fixed:
        _check_field(key, f"{where}: overrides", known)
    for key in extra_overrides:
        _check_field(key, "--set", known)
    fixed.update(extra_overrides)
    if raw.get("shared_init") is not None:
        fixed["model.pretrained"] = _shared_init(path, raw, fixed)
    space = _mapping(raw.get("space"), f"{where}: space")
    for key in space:
        _check_field(key, f"{where}: space", known)
    method_space = _mapping(raw.get("method_space"), f"{where}: method_space")
    for method, entries in method_space.items():
        if method not in methods:
            raise SweepError(f"{where}: method_space: {method!r} is not one of the sweep's methods {methods}")
        for key in _mapping(entries, f"{where}: method_space.{method}"):
            _check_field(key, f"{where}: method_space.{method}", known)
    slurm = _mapping(raw.get("slurm"), f"{where}: slurm")
    for key in slurm:
        if key not in SLURM_KEYS:
            raise SweepError(f"{where}: slurm: unknown key {key!r}; known: {', '.join(SLURM_KEYS)}")
    sbatch = slurm.get("sbatch", [])
    if not isinstance(sbatch, list) or not all(isinstance(o, str) and o.startswith("--") for o in sbatch):
        raise SweepError(f"{where}: slurm.sbatch must be a list of sbatch options (--time=8:00:00); got {sbatch!r}")
    max_parallel = slurm.get("max_parallel")
    if max_parallel is not None and not (isinstance(max_parallel, int) and max_parallel >= 1):
        raise SweepError(f"{where}: slurm.max_parallel must be a positive integer; got {max_parallel!r}")

    base_args = [f"--{k}={cli_value(v)}" for k, v in fixed.items()]
    if "run.experiment" not in fixed:
        base_args.append(f"--run.experiment={name}")
    preset_config = _resolve(preset, base_args, f"{where}: overrides")
    preset_flat = flatten(to_dict(preset_config))

    runs: list[RunSpec] = []
    trials_per_method = {}
    searched = False  # a distribution in some method's space
    for method in methods:
        entries = {}
        if use_defaults:
            entries.update(default_space(method, preset_flat))
        entries.update(space)
        entries.update(method_space.get(method) or {})
        others = set(METHODS) - {method}  # another method's section means nothing to this one
        entries = {k: v for k, v in entries.items() if k.split(".", 1)[0] not in others}
        trials, trial_fixed, random = _trials(entries, n_trials, search_seed, f"{where}: space ({method})")
        searched = searched or random
        _check_extremes(preset, base_args, method, entries, where)
        trials_per_method[method] = len(trials)
        width = max(2, len(str(len(trials) - 1)))
        fixed_args = [f"--{k}={cli_value(v)}" for k, v in trial_fixed.items()]
        for target in targets:
            label = target or preset_config.target_label()
            for trial, hparams in enumerate(trials):
                for seed in seeds:
                    run_name = f"{method}-{label}-t{trial:0{width}d}-s{seed}"
                    overrides = [f"--algorithm={method}", *([f"--data.target={target}"] if target else []),
                                 f"--run.seed={seed}", *base_args, *fixed_args,
                                 *(f"--{k}={cli_value(v)}" for k, v in hparams.items()),
                                 f"--run.name={name}-{run_name}"]
                    if seed == seeds[0] and (trial == 0 or target == targets[0]):
                        # Each trial and each target once: seeds change no setting that can be invalid.
                        _resolve(preset, overrides, f"{where}: run {run_name}")
                    runs.append(RunSpec(len(runs), run_name, Path(method) / label / f"t{trial:0{width}d}-s{seed}",
                                        method, target, seed, trial, hparams, tuple(overrides), preset))
    if n_trials not in (None, 1) and not searched:
        raise SweepError(f"{where}: n_trials {n_trials} without a distribution would repeat the same "
                         "settings; add a distribution or drop n_trials")
    return Sweep(path, name, preset, runs, {"sbatch": list(sbatch), "max_parallel": max_parallel},
                 trials_per_method)


def _shared_init(path: Path, raw: dict, fixed: dict) -> str:
    """shared_init: one run or checkpoint every trial starts from, as an absolute path (relative
    paths are read from the sweep file's folder, then from here)."""
    from rsc_dist.core.errors import ConfigError
    from rsc_dist.models.weights import run_weights_location

    value = raw["shared_init"]
    where = f"{path}: shared_init"
    if not isinstance(value, str) or not value:
        raise SweepError(f"{where} must be the path of a run folder or checkpoint; got {value!r}")
    if "model.pretrained" in fixed:
        raise SweepError(f"{where} sets model.pretrained for every run; remove model.pretrained from overrides/--set")
    for name, entries in [("space", raw.get("space") or {}), *((f"method_space.{m}", e or {}) for m, e in
                                                                (raw.get("method_space") or {}).items())]:
        if isinstance(entries, dict) and "model.pretrained" in entries:
            raise SweepError(f"{where}: {name} also searches model.pretrained; a shared start is one checkpoint")
    beside = path.parent / value
    chosen = (beside if beside.exists() else Path(value).expanduser()).resolve()
    try:
        found = run_weights_location(chosen) if chosen.is_dir() else (chosen if chosen.is_file() else None)
    except ConfigError as exc:
        raise SweepError(f"{where}: {str(exc).removeprefix(f'model.pretrained={chosen}: ')}") from None
    if found is None:
        raise SweepError(f"{where}: {value} does not exist (looked beside the sweep file and from {Path.cwd()})")
    return str(chosen)


def _trials(entries: dict, n_trials: int | None, seed: int, where: str) -> tuple[list[dict], dict, bool]:
    """(the trials' searched values, the space's fixed values, whether any is drawn): the
    product of the grid axes, each crossed with n_trials random draws (one without a
    distribution: ERM when only rsc.* fields are drawn)."""
    fixed, grid, random = {}, {}, {}
    try:
        for key, raw in entries.items():
            kind, value = parse_entry(key, raw, where)
            {"fixed": fixed, "grid": grid, "random": random}[kind][key] = value
    except SpaceError as exc:
        raise SweepError(str(exc)) from None
    if random and n_trials is None:
        raise SweepError(f"{where}: n_trials is needed for the random search over {', '.join(random)}")
    draws = n_trials if random else 1
    trials = []
    for point in itertools.product(*grid.values()):
        for draw in range(draws):
            values = dict(zip(grid, point))
            values.update({key: dist.draw(unit(seed, draw, key)) for key, dist in random.items()})
            trials.append({key: values[key] for key in entries if key in values})
    return trials, fixed, bool(random)


def _check_extremes(preset: str, base_args: list[str], method: str, entries: dict, where: str) -> None:
    """The bounds of every distribution must be valid values of their field (a draw inside
    them then is too), even when no draw happens to reach them."""
    for key, raw in entries.items():
        kind, value = parse_entry(key, raw, where)
        if isinstance(value, Distribution):
            for extreme in value.extremes():
                _resolve(preset, [f"--algorithm={method}", *base_args, f"--{key}={cli_value(extreme)}"],
                         f"{where}: space ({method}): {key}: {value.describe()}")


def _resolve(preset: str, overrides: list[str], where: str) -> Config:
    try:
        return load_config(preset, overrides)
    except ConfigError as exc:
        message = str(exc)
        if message.startswith("command line: "):
            message = message[len("command line: "):]
        raise SweepError(f"{where}: {message}") from None
