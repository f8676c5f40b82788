"""Cut each (domain, split) into shard jobs: seeded sample order, limits by count and by bytes.

Samples are shuffled (seeded) before sharding so that every shard mixes classes: a trainer
streaming a few shards at a time then sees all classes, not one class per shard. The plan depends
only on the listing (paths, sizes), so it is fixed before any image is opened; images skipped
while writing make a shard smaller than planned, never move samples between shards.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass

from data_prep import DATA_PREP_VERSION
from data_prep.images import MAX_PIXELS
from data_prep.records import SourceRecord
from data_prep.tarshard import TAR_RECORD, estimated_sample_bytes


@dataclass(frozen=True)
class PlannedSample:
    record: SourceRecord
    key: str
    domain_index: int
    size: int  # bytes on disk at planning time
    mtime_ns: int


@dataclass(frozen=True)
class ShardJob:
    domain: str
    split: str
    index: int
    samples: tuple[PlannedSample, ...]
    max_pixels: int = MAX_PIXELS  # images with more pixels are skipped


    @property
    def file(self) -> str:
        return f"{self.domain}/{self.split}-{self.index:06d}.tar"

    def fingerprint(self) -> str:
        """Changes whenever the shard's bytes could: inputs (by size and mtime), keys, labels, pixel limit,
        version."""
        rows = [[s.key, s.record.src, s.record.label, s.domain_index, s.size, s.mtime_ns] for s in self.samples]
        text = json.dumps([DATA_PREP_VERSION, self.file, self.max_pixels, rows], separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sample_order(samples: list[PlannedSample], *, seed: int, domain: str, split: str) -> list[PlannedSample]:
    ordered = sorted(samples, key=lambda s: s.record.src)
    random.Random(f"order:{seed}:{domain}:{split}").shuffle(ordered)
    return ordered


def cut_into_shards(samples: list[PlannedSample], *, domain: str, split: str, shard_samples: int,
                    shard_bytes: int, max_pixels: int = MAX_PIXELS) -> list[ShardJob]:
    """Greedy cut: a shard closes before it would pass either limit (a lone oversized sample still fits)."""
    jobs, current, current_bytes = [], [], TAR_RECORD
    for sample in samples:
        size = estimated_sample_bytes(sample.size, sample.record.src)
        if current and (len(current) >= shard_samples or current_bytes + size > shard_bytes):
            jobs.append(ShardJob(domain, split, len(jobs), tuple(current), max_pixels))
            current, current_bytes = [], TAR_RECORD
        current.append(sample)
        current_bytes += size
    if current:
        jobs.append(ShardJob(domain, split, len(jobs), tuple(current), max_pixels))
    return jobs
