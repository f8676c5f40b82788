"""The sweep file's keys, typed: read by the machinery that reads presets (rsc_dist.config:
unknown keys with a suggestion, types, ranges), so one place says what each key accepts.
What a key means for the runs is rsc_dist/sweep/spec.py's business (and docs: README, "Sweeps").

    name: pacs_r18_search          # default: the file's name without .yaml
    preset: pacs_resnet18          # a preset name, or a YAML path (relative to this file)
    protocol: paired               # paired (default) | domainbed: how trials are drawn
    methods: [erm, rsc]
    targets: [art_painting, cartoon, photo, sketch]   # default: the preset's own; "all": every domain
    target_pairs: false            # also every pair (target, other domain): leave-one-domain-out
    seeds: [0, 1, 2]               # trial seeds
    overrides:                     # fixed settings of every run
      data.root: /shared/shards/pacs
    default_space: true            # paired: start from the per-method registry (space.default_space)
    space:                         # every method; replaces registry entries of the same field
      optim.weight_decay: [0.0, 5.0e-4]            # a list: a grid axis (paired only)
      optim.lr: {log_uniform: [1.0e-3, 1.0e-1]}     # a distribution: random search
    method_space:                  # one method only; replaces the entries above
      rsc: {rsc.p_batch: {choice: [0.25, 0.33]}}
    shared_init: runs/lp/erm/sketch/seed0-XXXX   # every run starts from this run's weights
                                   # (model.pretrained; DiWA's shared start, so that
                                   # python -m rsc_dist.soup can average the runs)
    n_trials: 8                    # random draws (paired: per grid point; domainbed: hparams seeds)
    search_seed: 0                 # seeds the draws
    holdout_fraction: 0.2          # domainbed: data.holdout_fraction of every run
    slurm: {sbatch: [--gpus-per-node=1, --time=8:00:00], max_parallel: 16}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rsc_dist import methods
from rsc_dist.core.fields import section, setting

PROTOCOLS = ("paired", "domainbed")


@dataclass(frozen=True)
class SlurmSection:
    sbatch: tuple[str, ...] = setting((), "extra sbatch options of every array task (--time=8:00:00)")
    max_parallel: int | None = setting(None, "array tasks running at once (--array=...%N)", check="positive")


@dataclass(frozen=True)
class SweepFile:
    preset: str = setting("", "a preset name (pacs_resnet18) or a YAML path, relative to the sweep file")
    name: str | None = setting(None, "the sweep's name (letters, digits, _ . + -); default: the file's name")
    protocol: Literal[PROTOCOLS] = setting(
        "paired", "paired: a trial's values are shared by every trial seed (and paired across methods); "
        "domainbed: DomainBed's protocol, drawn per (hparams seed, trial seed), hparams seed 0 = defaults")
    methods: tuple[Literal[methods.NAMES], ...] = setting(("rsc",), "the registered methods to run")
    targets: tuple[str, ...] | None = setting(
        None, "held-out domains, one run each; all: every domain of the dataset; default: the preset's target")
    target_pairs: bool = setting(
        False, "also a run per pair (target, another domain), for leave-one-domain-out selection")
    seeds: tuple[int, ...] = setting((0,), "trial seeds", check="nonnegative")
    overrides: dict = setting({}, "fixed settings of every run ({dotted field: value})")
    default_space: bool = setting(False, "paired: start from the per-method default spaces (space.py)")
    space: dict = setting({}, "searched fields of every method ({dotted field: list or distribution})")
    method_space: dict = setting({}, "searched fields of one method ({method: {dotted field: ...}})")
    n_trials: int | None = setting(None, "random draws (paired: per grid point; domainbed: hparams seeds, 20)",
                                   check="positive")
    search_seed: int = setting(0, "seeds the random draws")
    holdout_fraction: float | None = setting(
        None, "domainbed: the validation fraction of every domain, drawn per trial seed (0.2)", check="fraction")
    shared_init: str | None = setting(
        None, "a run folder or checkpoint every run starts from (model.pretrained; relative paths: beside "
              "the sweep file, then the working directory), so that python -m rsc_dist.soup can average the runs")
    slurm: SlurmSection = section(SlurmSection)
