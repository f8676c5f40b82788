"""Seeded, stratified train/val holdout for layouts that ship no split files.

Deterministic across runs and machines: the files of each (domain, class) are sorted, shuffled by a
Random seeded from a string (random.Random hashes str seeds with SHA-512, not Python's salted
hash()), and the first round(fraction * n) go to "val".
"""
from __future__ import annotations

import random
from dataclasses import replace

from data_prep.records import SourceRecord


def split_holdout(records: list[SourceRecord], *, fraction: float, seed: int,
                  held_out: str = "val") -> list[SourceRecord]:
    """Return the records with split set to "train" or `held_out`, stratified by domain and class."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {fraction}")
    groups: dict[tuple[str, int], list[SourceRecord]] = {}
    for record in records:
        groups.setdefault((record.domain, record.label), []).append(record)
    result = []
    for (domain, label), group in sorted(groups.items()):
        group = sorted(group, key=lambda r: r.src)
        random.Random(f"holdout:{seed}:{domain}:{label}").shuffle(group)
        n_held = round(fraction * len(group))
        result += [replace(r, split=held_out if i < n_held else "train") for i, r in enumerate(group)]
    return sorted(result, key=lambda r: r.src)
