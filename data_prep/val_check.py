"""Source validation coverage: every (domain, class) that trains should have a val sample.

Model selection on source validation (the paper's recipes, DomainBed's training-domain
validation) cannot see a class that has none; a small class under a seeded holdout, a split file
without it, or an image skipped while writing can leave it with 0. Such gaps are warnings
(`no_val`), one per (domain, class) in _report.json and on the console; --strict refuses them.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from data_prep.records import Problem, SourceRecord


def val_gaps(records: Iterable[SourceRecord]) -> dict[tuple[str, int], int]:
    """{(domain, class index): train samples} for each pair with train samples and no val sample."""
    counts = Counter((r.domain, r.label, r.split) for r in records)
    return {(domain, label): n for (domain, label, split), n in sorted(counts.items())
            if split == "train" and not counts[(domain, label, "val")]}


def no_val_problems(gaps: dict[tuple[str, int], int], classes: list[str]) -> list[Problem]:
    return [Problem("no_val", "warning", f"{domain}/{classes[label]}", f"class {classes[label]!r} of domain {domain!r} has {n_train} train "
                    "and 0 val samples: source validation cannot see it")
            for (domain, label), n_train in gaps.items()]
