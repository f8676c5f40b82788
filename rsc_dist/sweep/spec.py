"""The sweep file and its deterministic expansion into runs (its keys: rsc_dist/sweep/schema.py).

Runs are methods x test domains x trials x seeds, in that order; run K of the list is always
the same run, named METHOD-TARGET-tTT-sS, in the folder OUT/METHOD/TARGET/tTT-sS. Two protocols
(the file's `protocol:`) decide what a trial is:

- paired (default): a trial is one hyperparameter setting, shared by every target and trial
  seed (so a setting has a mean over seeds), and draw k is the same for every method; grid axes
  (lists) are crossed with n_trials random draws; run.seed is the trial seed. `rsc.*` fields are
  left out of ERM's space (ERM never reads them), so ERM may have fewer trials.
- domainbed: DomainBed's protocol (rsc_dist/sweep/domainbed.py): trial k is hparams seed k,
  drawn anew for every trial seed from DomainBed's registry (hparams seed 0: the defaults); each
  trial seed also draws the validation split (data.holdout_seed) and each run hashes its own
  run.seed, as DomainBed does.

A field fixed in `overrides` (or --set) and searched by the space is an error naming it:
the search would silently replace the override.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rsc_dist import methods
from rsc_dist.config import (Config, ConfigError, describe_fields, flatten, load_config, parse_section,
                             suggest_dotted, to_dict)
from rsc_dist.core.errors import UsageError
from rsc_dist.sweep import domainbed
from rsc_dist.sweep.dataset import DatasetInfo, dataset_problems, read_dataset
from rsc_dist.sweep.schema import SweepFile
from rsc_dist.sweep.space import Distribution, SpaceError, default_space, parse_entry, unit

METHODS = methods.NAMES
# Set by the sweep for each run: written in methods/targets/seeds, or by the launcher.
RESERVED = {"algorithm": "methods", "data.target": "targets", "run.seed": "seeds",
            "run.output_dir": "the launcher (--out)", "run.name": "the sweep (the run's name)"}
RESERVED_DOMAINBED = {**RESERVED, "data.holdout_seed": "seeds (the trial seed draws the split)",
                      "data.holdout_fraction": "holdout_fraction"}


class SweepError(UsageError):
    """A sweep file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class RunSpec:
    index: int  # place in the expansion
    name: str  # METHOD-TARGET-tTT-sS
    relative: Path  # METHOD/TARGET/tTT-sS, under the sweep's output folder
    method: str
    targets: tuple[str, ...]  # held-out domains; (): the preset's own target
    seed: int  # the trial seed
    trial: int  # the trial (domainbed: the hparams seed)
    hparams: dict  # the trial's searched values {field: value}
    overrides: tuple[str, ...]  # the trainer's overrides, --key=value
    preset: str
    run_seed: int  # run.seed (paired: the trial seed)

    @property
    def target(self) -> str | None:
        """The run's held-out domains as one label (a+b for a pair); None: the preset's own."""
        return "+".join(self.targets) or None

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
    protocol: str = "paired"
    dataset: DatasetInfo | None = None  # None: not readable here (unchecked_reason says why)
    unchecked_reason: str = ""
    notes: tuple[str, ...] = field(default=())  # shown above the listing

    def default_out(self) -> Path:
        return Path("runs") / self.name

    def require_dataset(self) -> None:
        """Before anything starts or is submitted: the dataset must have been checked."""
        if self.dataset is None:
            raise SweepError(f"{self.path}: {self.unchecked_reason}: the sweep's domains and classes cannot be "
                             "checked, so nothing is started; run it where the shards are (or fix data.root)")


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


def _check_field(name: str, where: str, known: set[str], reserved: dict) -> None:
    if not isinstance(name, str) or name not in known:
        close = suggest_dotted(name, known)
        hint = f"did you mean {close}?" if close else "`python -m rsc_dist.train --help` lists them"
        raise SweepError(f"{where}: unknown config field {name!r}; {hint}")
    if name in reserved:
        raise SweepError(f"{where}: {name} is set by {reserved[name]}, not here")


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
    try:
        spec = parse_section(SweepFile, raw, str(path))
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    return _expand(path, spec, set(raw), extra_overrides or {})


@dataclass
class _Context:
    """What both protocols' expansions share, checked once."""
    where: str
    name: str
    preset: str
    methods: list[str]
    seeds: list[int]
    base_args: list[str]
    fixed: dict
    preset_config: Config
    flat: dict
    test_sets: list[tuple[str, ...]]
    dataset: DatasetInfo | None


def _expand(path: Path, spec: SweepFile, given: set[str], extra_overrides: dict) -> Sweep:
    where = str(path)
    name = spec.name or path.stem
    if not name.replace("-", "").replace("_", "").replace(".", "").replace("+", "").isalnum():
        raise SweepError(f"{where}: name {name!r} may only hold letters, digits and _ . + -")
    if not spec.preset:
        raise SweepError(f"{where}: missing key 'preset' (a preset name such as pacs_resnet18, or a YAML path)")
    preset = spec.preset
    if preset.endswith((".yaml", ".yml")):  # a file: beside the sweep file, else from here; absolute
        beside = path.parent / preset      # so every launcher's trainer finds it from any directory
        preset = str((beside if beside.is_file() else Path(preset)).resolve())
    _resolve(preset, [], f"{where}: preset")
    chosen = list(spec.methods)
    if not chosen:
        raise SweepError(f"{where}: methods is empty; name at least one of {', '.join(METHODS)}")
    if len(set(chosen)) != len(chosen):
        raise SweepError(f"{where}: methods lists a method twice: {chosen}")
    bad_options = [o for o in spec.slurm.sbatch if not o.startswith("--")]
    if bad_options:
        raise SweepError(f"{where}: slurm.sbatch: each entry is an sbatch option such as --time=8:00:00; "
                         f"got {bad_options}")
    domainbed_protocol = spec.protocol == "domainbed"
    seeds = list(domainbed.DEFAULT_SEEDS if domainbed_protocol and "seeds" not in given else spec.seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise SweepError(f"{where}: seeds must list distinct trial seeds; got {seeds}")
    reserved = RESERVED_DOMAINBED if domainbed_protocol else RESERVED

    known = config_fields()
    fixed = dict(spec.overrides)
    for key in fixed:
        _check_field(key, f"{where}: overrides", known, reserved)
    for key in extra_overrides:
        _check_field(key, "--set", known, reserved)
    fixed.update(extra_overrides)
    if spec.shared_init is not None:
        fixed["model.pretrained"] = _shared_init(path, spec, fixed)
    for key in spec.space:
        _check_field(key, f"{where}: space", known, reserved)
    for method, entries in spec.method_space.items():
        if method not in chosen:
            raise SweepError(f"{where}: method_space: {method!r} is not one of the sweep's methods {chosen}")
        if not isinstance(entries, dict):
            raise SweepError(f"{where}: method_space.{method} must be a mapping of config fields; got {entries!r}")
        for key in entries:
            _check_field(key, f"{where}: method_space.{method}", known, reserved)
    for key in list(spec.space) + list(fixed):
        owner = key.split(".", 1)[0]
        if owner in methods.sections() and owner not in chosen:
            place = "space" if key in spec.space else "overrides"
            raise SweepError(f"{where}: {place}: {key} belongs to method {owner}, which the sweep does not run "
                             f"(methods: {', '.join(chosen)}); drop it or add {owner} to methods")

    base_args = [f"--{k}={cli_value(v)}" for k, v in fixed.items()]
    if "run.experiment" not in fixed:
        base_args.append(f"--run.experiment={name}")
    preset_config = _resolve(preset, base_args, f"{where}: overrides")
    flat = flatten(to_dict(preset_config))
    try:
        found = read_dataset(preset_config)
    except UsageError as exc:
        raise SweepError(f"{where}: {exc}") from None
    dataset = found if isinstance(found, DatasetInfo) else None
    test_sets = _test_sets(where, spec, preset_config, dataset, "" if dataset else found)
    if dataset is not None:
        problems = dataset_problems(dataset, preset_config, sorted({t for s in test_sets for t in s}))
        if problems:
            raise SweepError(f"{where}: " + "; ".join(problems))
    context = _Context(where, name, preset, chosen, seeds, base_args, fixed, preset_config, flat, test_sets, dataset)
    if domainbed_protocol:
        runs, trials, notes = _expand_domainbed(context, spec, given)
    else:
        runs, trials, notes = _expand_paired(context, spec)
    if dataset is None:
        notes = (*notes, f"{found}: domains and classes not checked (launchers that run or submit refuse)")
    return Sweep(path, name, preset, runs, {"sbatch": list(spec.slurm.sbatch), "max_parallel": spec.slurm.max_parallel},
                 trials, spec.protocol, dataset, "" if dataset else found, tuple(notes))


def _test_sets(where: str, spec: SweepFile, preset_config: Config, dataset: DatasetInfo | None,
               unreadable: str) -> list[tuple[str, ...]]:
    """The held-out domain sets, one run set each: the targets alone, then the pairs."""
    targets = spec.targets
    if targets is None:
        if spec.target_pairs:
            raise SweepError(f"{where}: target_pairs needs targets (a list, or all)")
        return [()]
    if targets == ("all",):
        if dataset is None:
            raise SweepError(f"{where}: targets: all needs the dataset's domains, but {unreadable}")
        targets = dataset.domains
    if not targets or not all(targets) or len(set(targets)) != len(targets):
        raise SweepError(f"{where}: targets must be a list of distinct domain names (or all); got {list(targets)}")
    if spec.target_pairs and dataset is None:
        raise SweepError(f"{where}: target_pairs needs the dataset's domains, but {unreadable}")
    domains = list(dataset.domains) if dataset is not None else None
    return domainbed.test_domain_sets(list(targets), domains, spec.target_pairs)


def _searched(entries: dict) -> dict:
    """{field: entry} of the entries that vary between trials (grid axes and distributions)."""
    return {key: raw for key, raw in entries.items() if isinstance(raw, (list, dict))}


def _check_conflicts(context: _Context, method: str, entries: dict, sources: dict) -> None:
    for key in _searched(entries):
        if key in context.fixed:
            raise SweepError(f"{context.where}: {key} is fixed in overrides (or --set) and searched by "
                             f"{sources[key]} for {method}: the search would replace the override; remove it from "
                             f"overrides, or fix it in space ({key}: VALUE), which replaces the searched entry")


def _method_entries(context: _Context, spec: SweepFile, method: str, registry: dict, registry_name: str):
    """({field: raw entry}, {field: where it came from}) of one method: the registry, then the
    file's space and method_space, without other methods' sections."""
    entries, sources = {}, {}
    for layer, origin in ((registry, registry_name), (spec.space, "space"),
                          (spec.method_space.get(method) or {}, f"method_space.{method}")):
        for key, raw in layer.items():
            entries[key], sources[key] = raw, origin
    others = set(METHODS) - {method}  # another method's section means nothing to this one
    entries = {k: v for k, v in entries.items() if k.split(".", 1)[0] not in others}
    _check_conflicts(context, method, entries, sources)
    return entries


def _expand_paired(context: _Context, spec: SweepFile):
    if spec.holdout_fraction is not None:
        raise SweepError(f"{context.where}: holdout_fraction is a key of protocol domainbed; in a paired sweep "
                         "set data.holdout_fraction in overrides")
    runs: list[RunSpec] = []
    trials_per_method = {}
    searched = False  # a distribution in some method's space
    for method in context.methods:
        registry = default_space(method, context.flat) if spec.default_space else {}
        entries = _method_entries(context, spec, method, registry, "default_space")
        trials, trial_fixed, random = _trials(entries, spec.n_trials, spec.search_seed,
                                              f"{context.where}: space ({method})")
        searched = searched or random
        _check_extremes(context, method, entries)
        trials_per_method[method] = len(trials)
        fixed_args = [f"--{k}={cli_value(v)}" for k, v in trial_fixed.items()]
        for test_set in context.test_sets:
            for trial, hparams in enumerate(trials):
                for seed in context.seeds:
                    extra = [*fixed_args, *(f"--{k}={cli_value(v)}" for k, v in hparams.items())]
                    check = seed == context.seeds[0] and (trial == 0 or test_set == context.test_sets[0])
                    runs.append(_run(context, runs, method, test_set, trial, len(trials), seed, seed, hparams,
                                     extra, check))
    if spec.n_trials not in (None, 1) and not searched:
        raise SweepError(f"{context.where}: n_trials {spec.n_trials} without a distribution would repeat the same "
                         "settings; add a distribution or drop n_trials")
    return runs, trials_per_method, ()


def _expand_domainbed(context: _Context, spec: SweepFile, given: set[str]):
    where = context.where
    if spec.default_space:
        raise SweepError(f"{where}: default_space: protocol domainbed always searches DomainBed's registry "
                         "(rsc_dist/sweep/domainbed.py); drop default_space")
    problems = domainbed.preset_problems(context.flat, context.methods)
    if problems:
        raise SweepError(f"{where}: protocol domainbed: the preset (with overrides) differs from what DomainBed "
                         f"fixes: {'; '.join(problems)}")
    n_trials = spec.n_trials or domainbed.DEFAULT_TRIALS
    fraction = domainbed.DEFAULT_HOLDOUT if spec.holdout_fraction is None else spec.holdout_fraction
    if not 0 < fraction < 1:
        raise SweepError(f"{where}: holdout_fraction must be in (0, 1) under protocol domainbed; got {fraction}")
    dataset_name = context.dataset.name if context.dataset else context.flat.get("data.dataset", "")
    runs: list[RunSpec] = []
    for method in context.methods:
        registry = domainbed.registry(methods.get(method), context.flat, dataset_name)
        entries = _method_entries(context, spec, method, {k: dist for k, (_, dist) in registry.items()},
                                  "DomainBed's registry")
        defaults = {key: registry[key][0] if key in registry else context.flat.get(key) for key in entries}
        for key, raw in entries.items():
            if isinstance(raw, list):
                raise SweepError(f"{where}: space: {key}: a grid axis; protocol domainbed draws every trial "
                                 "(use a distribution such as {choice: [...]}, or protocol paired)")
        _check_extremes(context, method, entries)
        for test_set in context.test_sets:
            for trial in range(n_trials):
                for seed in context.seeds:
                    hparams = domainbed.draw_trial(entries, defaults, trial, seed, spec.search_seed,
                                                   f"{where}: space ({method})")
                    run_seed = domainbed.run_seed(method, test_set, trial, seed)
                    extra = [f"--data.holdout_fraction={fraction!r}",
                             f"--data.holdout_seed={seed}", *(f"--{k}={cli_value(v)}" for k, v in hparams.items())]
                    sources = domainbed.source_count(context.preset_config, context.dataset, test_set)
                    if sources and "data.batch_size" in hparams:  # DomainBed's batch is per domain and step
                        extra.append(f"--data.global_batch_size={hparams['data.batch_size'] * sources}")
                    check = trial == 0 or (seed == context.seeds[0] and test_set == context.test_sets[0])
                    runs.append(_run(context, runs, method, test_set, trial, n_trials, seed, run_seed, hparams,
                                     extra, check))
    notes = (f"protocol domainbed: {n_trials} hparams seeds (0 = DomainBed's defaults) x {len(context.seeds)} "
             f"trial seeds, drawn per (hparams seed, trial seed); holdout {fraction:g} of every domain per trial seed; "
             "data.batch_size is DomainBed's batch per source domain, each run's data.global_batch_size that times its "
             "source domains (the same batch on any number of processes)",)
    return runs, {m: n_trials for m in context.methods}, notes


def _run(context: _Context, runs: list, method: str, test_set: tuple[str, ...], trial: int, n_trials: int, seed: int,
         run_seed: int, hparams: dict, extra: list[str], check: bool) -> RunSpec:
    width = max(2, len(str(n_trials - 1)))
    label = "+".join(test_set) or context.preset_config.target_label()
    run_name = f"{method}-{label}-t{trial:0{width}d}-s{seed}"
    target_args = [f"--data.target={','.join(test_set)}"] if test_set else []
    overrides = [f"--algorithm={method}", *target_args, f"--run.seed={run_seed}", *context.base_args, *extra,
                 f"--run.name={context.name}-{run_name}"]
    if check:  # each trial and test set once: seeds change no setting that can be invalid
        _resolve(context.preset, overrides, f"{context.where}: run {run_name}")
    return RunSpec(len(runs), run_name, Path(method) / label / f"t{trial:0{width}d}-s{seed}", method, test_set, seed,
                   trial, hparams, tuple(overrides), context.preset, run_seed)


def _shared_init(path: Path, spec: SweepFile, fixed: dict) -> str:
    """shared_init: one run or checkpoint every trial starts from, as an absolute path (relative
    paths are read from the sweep file's folder, then from here)."""
    from rsc_dist.core.errors import ConfigError
    from rsc_dist.models.weights import run_weights_location

    value = spec.shared_init
    where = f"{path}: shared_init"
    if not isinstance(value, str) or not value:
        raise SweepError(f"{where} must be the path of a run folder or checkpoint; got {value!r}")
    if "model.pretrained" in fixed:
        raise SweepError(f"{where} sets model.pretrained for every run; remove model.pretrained from overrides/--set")
    for name, entries in [("space", spec.space), *((f"method_space.{m}", e or {}) for m, e in
                                                   spec.method_space.items())]:
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


def _check_extremes(context: _Context, method: str, entries: dict) -> None:
    """The bounds of every distribution must be valid values of their field (a draw inside
    them then is too), even when no draw happens to reach them."""
    where = f"{context.where}: space ({method})"
    for key, raw in entries.items():
        try:
            kind, value = parse_entry(key, raw, where)
        except SpaceError as exc:
            raise SweepError(str(exc)) from None
        if isinstance(value, Distribution):
            for extreme in value.extremes():
                _resolve(context.preset, [f"--algorithm={method}", *context.base_args, f"--{key}={cli_value(extreme)}"],
                         f"{where}: {key}: {value.describe()}")


def _resolve(preset: str, overrides: list[str], where: str) -> Config:
    try:
        return load_config(preset, overrides)
    except ConfigError as exc:
        message = str(exc)
        if message.startswith("command line: "):
            message = message[len("command line: "):]
        raise SweepError(f"{where}: {message}") from None
