"""DomainBed's protocol for a sweep (``protocol: domainbed``), written down once.

DomainBed (Gulrajani & Lopez-Paz, ICLR 2021; github facebookresearch/DomainBed,
domainbed/hparams_registry.py, scripts/sweep.py, scripts/train.py) runs, for every method and
set of test domains, hparams seeds 0..n-1 x trial seeds 0..m-1. Each run's hyperparameters are
the registry's defaults for hparams seed 0, and otherwise a draw seeded by (hparams seed, trial
seed) and the hyperparameter's name: every trial seed searches other settings, and draw k of a
field is the same for every method and test domain. The trial seed also seeds the validation
split (data.holdout_seed here); the run's own seed hashes (method, test domains, hparams seed,
trial seed).

Here the hyperparameters every method shares come from ``SHARED`` (DomainBed's registry for
image datasets), each method's own from ``Method.sweep_space`` (DomainBed's distributions for
the methods DomainBed has; their defaults are the preset's values, the method section's
defaults unless the preset sets them). The numbers drawn are not DomainBed's own (another
hash, rsc_dist.sweep.space.unit); the distributions, the seeding structure and the defaults
are. ``PRESET_SETTINGS`` are what DomainBed's training loop fixes; a preset that differs is
refused, since the registry's ranges only mean something with them.
"""

from __future__ import annotations

import hashlib
import itertools

from rsc_dist.core.protocols import dataset_key
from rsc_dist.sweep.space import parse_entry, unit

# DomainBed's registry (hparams_registry._hparams) for the hyperparameters every method shares,
# on image datasets (not its 28 px MNIST variants): {field: (default, distribution)}.
SHARED = {
    "optim.lr": (5e-5, {"log_uniform": [1e-5, 10 ** -3.5]}),  # lr: 10**U(-5, -3.5)
    "optim.weight_decay": (0.0, {"log_uniform": [1e-6, 1e-2]}),  # weight_decay: 10**U(-6, -2)
    "data.batch_size": (32, {"int_log_uniform": [8, 2 ** 5.5]}),  # batch_size (per domain): int(2**U(3, 5.5))
    "model.dropout": (0.0, {"choice": [0.0, 0.1, 0.5]}),  # resnet_dropout: choice([0, 0.1, 0.5])
}
# Dataset-specific entries of the same registry: {dataset key: {field: (default, distribution)}}.
BY_DATASET = {"domainnet": {"data.batch_size": (32, {"int_log_uniform": [8, 2 ** 5]})}}  # int(2**U(3, 5))
# What DomainBed's training loop fixes: {field: (value, why)}; and per method.
PRESET_SETTINGS = {
    "data.sampling": ("balanced", "DomainBed's batch_size is per training domain"),
    "data.global_batch_size": (None, "the sweep sets it: DomainBed's batch per domain x the run's source domains"),
    "data.flip_double": (False, "DomainBed's batch is not doubled with mirror images"),
    "optim.name": ("adam", "DomainBed trains with Adam; its lr range 10^U(-5, -3.5) is Adam's"),
    "schedule.name": ("constant", "DomainBed's learning rate is constant"),
    "schedule.warmup_steps": (0, "DomainBed has no warmup"),
}
METHOD_SETTINGS = {
    "rsc": {"rsc.mode": ("channel", "DomainBed's RSC mutes channels of the pooled features only"),
            "rsc.strategy": ("top_gradient", "DomainBed's RSC ranks by the gradient"),
            "rsc.p_batch_schedule": ("constant", "DomainBed's rsc_b_drop_factor is constant")},
}
DEFAULT_TRIALS = 20  # DomainBed's --n_hparams
DEFAULT_SEEDS = (0, 1, 2)  # DomainBed's --n_trials
DEFAULT_HOLDOUT = 0.2  # DomainBed's --holdout_fraction


def preset_problems(flat: dict, methods: list[str]) -> list[str]:
    """``field: value (DomainBed: VALUE; why)`` for each preset setting DomainBed fixes otherwise."""
    wanted = dict(PRESET_SETTINGS)
    for method in methods:
        wanted.update(METHOD_SETTINGS.get(method, {}))
    return [f"{key}={flat.get(key)!r} (DomainBed: {value!r}; {why})"
            for key, (value, why) in wanted.items() if key in flat and flat[key] != value]


def registry(method_class, flat: dict, dataset: str) -> dict[str, tuple]:
    """{field: (default, distribution entry)} for one method on a preset (``flat``: the preset's
    resolved config, flat; ``dataset``: the data's name): the shared hyperparameters, then the
    method's own (``Method.sweep_space``) with the preset's values as their defaults."""
    entries = dict(SHARED)
    entries.update(BY_DATASET.get(dataset_key(dataset), {}))
    for key, distribution in method_class.sweep_space(flat).items():
        entries[key] = (flat[key], distribution)
    return entries


def draw_trial(entries: dict, defaults: dict, hparams_seed: int, trial_seed: int, search_seed: int,
               where: str) -> dict:
    """The values of one (hparams seed, trial seed): ``defaults`` for hparams seed 0 (fixed
    entries stay fixed), else each distribution drawn from a hash of (search seed, hparams seed,
    trial seed, field)."""
    values = {}
    for key, raw in entries.items():
        kind, value = parse_entry(key, raw, where)
        if kind == "fixed":
            values[key] = value
        elif hparams_seed == 0:
            values[key] = defaults[key]
        else:
            values[key] = value.draw(unit(search_seed, f"h{hparams_seed}t{trial_seed}", key))
    return values


def source_count(config, dataset, test_set: tuple[str, ...]) -> int | None:
    """How many source domains a run holding out ``test_set`` trains on (data.sources, else
    the dataset's other domains); None when the dataset cannot be read here."""
    if config.data.sources:
        return len(config.data.sources)
    if dataset is None or not test_set:
        return None
    return len(dataset.domains) - len(test_set)


def run_seed(method: str, targets: tuple[str, ...], hparams_seed: int, trial_seed: int) -> int:
    """run.seed of one run: a hash of what tells DomainBed's runs apart (its misc.seed_hash of
    dataset, algorithm, test envs, hparams seed and trial seed; the sweep's dataset is one)."""
    text = f"rsc_dist.domainbed|{method}|{','.join(targets)}|{hparams_seed}|{trial_seed}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 2**31


def test_domain_sets(targets: list[str], domains: list[str] | None, pairs: bool) -> list[tuple[str, ...]]:
    """Each target alone, then (with ``pairs``) each target with every other domain of the
    dataset, once per pair: the runs leave-one-domain-out selection needs (DomainBed's
    all_test_env_combinations restricted to the asked targets)."""
    sets = [(t,) for t in targets]
    if pairs:
        seen = set()
        for first, other in itertools.product(targets, domains):
            pair = tuple(sorted((first, other), key=domains.index))
            if first != other and pair not in seen:
                seen.add(pair)
                sets.append(pair)
    return sets
