"""DomainBed's validation split, drawn when the data is loaded (data.holdout_fraction > 0).

DomainBed (scripts/train.py, lib/misc.split_dataset) splits EVERY domain, the held-out ones
included, into an out-split of int(n x holdout_fraction) samples and an in-split of the rest,
by a permutation seeded by (trial seed, domain): unstratified. Sources train on their
in-split and are validated on their out-split; a target is reported on its in-split, and its
out-split is what DomainBed's oracle selects by.

Here a domain's n samples are all of its shards' samples (every split the converter wrote,
pooled), in a canonical order (shard files sorted, then sample index); the first
floor(n x fraction) positions of a permutation seeded by (data.holdout_seed, domain index)
form the out-split. It reads only the manifest, so every rank, worker and resumed run draws
the same split. The samples chosen are not the ones DomainBed's own NumPy shuffle of its
ImageFolder order would choose (another generator over another order); the rule is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import numpy as np

from rsc_dist.core.seeding import mix_seed
from rsc_dist.data.order import ShardRef

SPLITS = ("train", "val", "test")
_STREAM = 0x484F4C44  # "HOLD": keeps this draw apart from the other uses of mix_seed


@dataclass(frozen=True)
class DomainSplit:
    inside: list[ShardRef]  # the in-split: shards with their selected samples (none empty)
    outside: list[ShardRef]  # the out-split

    @property
    def in_count(self) -> int:
        return sum(r.size for r in self.inside)

    @property
    def out_count(self) -> int:
        return sum(r.size for r in self.outside)


@dataclass(frozen=True)
class Holdout:
    fraction: float
    seed: int
    splits: dict[str, DomainSplit]  # domain -> its split

    def record(self) -> dict:
        """What results.json records (layout: rsc_dist/core/contracts.py, "holdout"): the rule's
        parameters, the sizes, and a digest of the out-splits' members, so two runs can be told
        to have validated on the same samples or not."""
        digest = hashlib.sha256()
        for domain in sorted(self.splits):
            for ref in self.splits[domain].outside:
                digest.update(f"{domain}|{'/'.join(ref.path.rsplit('/', 2)[-2:])}|{ref.selected}\n".encode())
        return {"fraction": self.fraction, "seed": self.seed,
                "in_n": {d: s.in_count for d, s in self.splits.items()},
                "out_n": {d: s.out_count for d, s in self.splits.items()},
                "out_digest": digest.hexdigest()[:16]}


def draw_holdout(manifest, domains, fraction: float, seed: int) -> Holdout:
    """The split of each of ``domains`` (names of ``manifest``, data_prep.manifest.Manifest)."""
    splits = {}
    for domain in domains:
        refs = sorted((ShardRef(str(manifest.root / shard.file), shard.num_samples, shard.num_bytes,
                                getattr(shard, "sample_offsets", None))
                       for split in SPLITS for shard in manifest.shards(domain, split)), key=lambda r: r.path)
        sizes = np.array([r.num_samples for r in refs], dtype=np.int64)
        total = int(sizes.sum())
        rng = np.random.Generator(np.random.PCG64(mix_seed(_STREAM, seed, manifest.domain_index(domain))))
        order = rng.permutation(total)
        held = np.zeros(total, dtype=bool)
        held[order[:int(total * fraction)]] = True
        splits[domain] = DomainSplit(_select(refs, sizes, ~held), _select(refs, sizes, held))
    return Holdout(fraction, seed, splits)


def _select(refs: list[ShardRef], sizes: np.ndarray, chosen: np.ndarray) -> list[ShardRef]:
    """Each shard with the samples ``chosen`` marks (positions in the canonical order); shards
    with none left out."""
    out = []
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    for ref, start, size in zip(refs, starts, sizes):
        indices = np.flatnonzero(chosen[start:start + size])
        if len(indices):
            out.append(replace(ref, selected=tuple(int(i) for i in indices)))
    return out
