"""The shard manifest `{root}/_info.json`: writing it atomically, and the reader the trainer uses.

    from data_prep.manifest import load_manifest, ManifestError
    manifest = load_manifest("/data/shards/pacs")
    manifest.classes, manifest.domains                 # one class order for all domains
    manifest.shard_paths("photo", "train")             # absolute Paths, in order
    manifest.num_samples("photo", "val")               # 0 for an empty split
    manifest.num_samples("photo")                      # whole domain (train + val + test)
    manifest.domain_index("photo")                     # the `dom` value stored in its samples
    shard = manifest.shards("photo", "train")[0]
    shard.sample_offsets                               # (o_0, ..., o_n): sample i = bytes [o_i, o_i+1)
    shard.sample_span(i)                               # (o_i, o_i+1)

Layout of the file (format_version 2):
    {"format_version": 2, "dataset": "pacs", "classes": [...], "domains": [...],
     "splits": {"<domain>": {"train"|"val"|"test": {"num_samples": N,
                 "shards": [{"file": "<domain>/<split>-000000.tar", "num_samples": n,
                             "num_bytes": b, "sha256": "...",
                             "sample_offsets": [o_0, o_1, ..., o_n]}]}}},
     "converter": {"format": ..., "args": {...}, "data_prep_version": ...},
     "skipped": <count>, "report": "_report.json"}
Every domain lists all three splits; an empty split has num_samples 0 and no shards.
sample_offsets has n + 1 strictly increasing ints: o_i is the byte offset of the first tar header of
sample i (its consecutive members sharing a key: image, cls, dom, src), o_n the offset just past
the padded data of the last member (where the end-of-archive zero blocks start), o_0 == 0 and
o_n <= num_bytes. data_prep.tarshard.parse_sample_span(bytes [o_i, o_i+1)) gives the sample.
format_version 1 is the same without sample_offsets; it still loads (ShardInfo.sample_offsets is
None) and `python -m data_prep index ROOT` upgrades it in place.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Mapping

from data_prep import SPLITS

MANIFEST_NAME = "_info.json"
REPORT_NAME = "_report.json"
FORMAT_VERSION = 2  # written; load_manifest reads every version in READABLE_VERSIONS
READABLE_VERSIONS = (1, 2)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(Exception):
    """A missing or invalid manifest; the message names the file and the key at fault."""


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the root, posix
    num_samples: int
    num_bytes: int
    sha256: str
    sample_offsets: tuple[int, ...] | None = None  # num_samples + 1 offsets; None in a version-1 manifest

    def sample_span(self, index: int) -> tuple[int, int]:
        """(start, end) byte range of sample `index` in the shard file."""
        if self.sample_offsets is None:
            raise ValueError(f"{self.file}: no sample offsets (version-1 manifest; run python -m data_prep index)")
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{self.file}: sample {index} out of range 0..{self.num_samples - 1}")
        return self.sample_offsets[index], self.sample_offsets[index + 1]


@dataclass(frozen=True)
class SplitInfo:
    num_samples: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Manifest:
    root: Path  # absolute
    dataset: str
    classes: tuple[str, ...]
    domains: tuple[str, ...]
    splits: Mapping[str, Mapping[str, SplitInfo]]
    converter: Mapping[str, Any]
    skipped: int
    report: str
    format_version: int = FORMAT_VERSION
    no_val: tuple[tuple[str, str], ...] = ()  # (domain, class) pairs with train and no val samples

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def domain_index(self, domain: str) -> int:
        self._check_domain(domain)
        return self.domains.index(domain)

    def shards(self, domain: str, split: str) -> tuple[ShardInfo, ...]:
        return self._split(domain, split).shards

    def shard_paths(self, domain: str, split: str) -> list[Path]:
        return [self.root / shard.file for shard in self.shards(domain, split)]

    def num_samples(self, domain: str, split: str | None = None) -> int:
        if split is None:
            return sum(self._split(domain, s).num_samples for s in SPLITS)
        return self._split(domain, split).num_samples

    def _check_domain(self, domain: str) -> None:
        if domain not in self.splits:
            raise KeyError(f"unknown domain {domain!r}; {self.root / MANIFEST_NAME} has {list(self.domains)}")

    def _split(self, domain: str, split: str) -> SplitInfo:
        self._check_domain(domain)
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; splits are {list(SPLITS)}")
        return self.splits[domain][split]


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write, flush to disk, then rename: readers see the old file or the whole new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # backslashreplace: a report may quote a file name that is not valid UTF-8
    with open(temporary, "w", encoding="utf-8", errors="backslashreplace") as handle:
        json.dump(payload, handle, indent=1, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_manifest(root: Path, payload: dict) -> None:
    write_json_atomic(Path(root) / MANIFEST_NAME, payload)


class _Reader:
    """Typed access to the parsed JSON that names the file and key of the first fault."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, message: str) -> ManifestError:
        return ManifestError(f"{self.path}: key {key!r}: {message}")

    def get(self, mapping: Any, name: str, kind: type | tuple, where: str) -> Any:
        key = f"{where}.{name}" if where else name
        if not isinstance(mapping, dict) or name not in mapping:
            raise self.fail(key, "missing")
        value = mapping[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(key, f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
        return value

    def count(self, mapping: Any, name: str, where: str) -> int:
        value = self.get(mapping, name, int, where)
        if value < 0:
            raise self.fail(f"{where}.{name}", f"negative count {value}")
        return value

    def names(self, mapping: Any, name: str) -> tuple[str, ...]:
        values = self.get(mapping, name, list, "")
        if not all(isinstance(v, str) and v for v in values) or len(set(values)) != len(values):
            raise self.fail(name, "expected a list of distinct non-empty strings")
        return tuple(values)


def _offsets(reader: _Reader, raw: Any, where: str, num_samples: int, num_bytes: int) -> tuple[int, ...]:
    key = f"{where}.sample_offsets"
    values = reader.get(raw, "sample_offsets", list, where)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise reader.fail(key, "expected a list of ints")
    if len(values) != num_samples + 1:
        raise reader.fail(key, f"expected num_samples + 1 = {num_samples + 1} offsets, got {len(values)}")
    if values[0] != 0:
        raise reader.fail(key, f"first offset must be 0, got {values[0]}")
    bad = next((i for i in range(1, len(values)) if values[i] <= values[i - 1]), None)
    if bad is not None:
        raise reader.fail(key, f"offsets must increase strictly: [{bad - 1}] = {values[bad - 1]}, [{bad}] = {values[bad]}")
    if values[-1] > num_bytes:
        raise reader.fail(key, f"last offset {values[-1]} is past num_bytes {num_bytes}")
    return tuple(values)


def _shard(reader: _Reader, raw: Any, where: str, domain: str, split: str, version: int) -> ShardInfo:
    file = reader.get(raw, "file", str, where)
    path = PurePosixPath(file)
    if path.is_absolute() or ".." in path.parts or path.parts[:1] != (domain,) or not path.name.startswith(f"{split}-"):
        raise reader.fail(f"{where}.file", f"{file!r} is not {domain}/{split}-NNNNNN.tar inside the root")
    sha256 = reader.get(raw, "sha256", str, where)
    if not _SHA256.match(sha256):
        raise reader.fail(f"{where}.sha256", "expected 64 lowercase hex digits")
    num_samples, num_bytes = reader.count(raw, "num_samples", where), reader.count(raw, "num_bytes", where)
    offsets = _offsets(reader, raw, where, num_samples, num_bytes) if version >= 2 else None
    return ShardInfo(file, num_samples, num_bytes, sha256, offsets)


def _split_info(reader: _Reader, raw: Any, where: str, domain: str, split: str, version: int) -> SplitInfo:
    num_samples = reader.count(raw, "num_samples", where)
    shards = tuple(_shard(reader, shard, f"{where}.shards[{i}]", domain, split, version)
                   for i, shard in enumerate(reader.get(raw, "shards", list, where)))
    if sum(s.num_samples for s in shards) != num_samples:
        raise reader.fail(f"{where}.num_samples", f"{num_samples} != sum over its shards "
                                                  f"({sum(s.num_samples for s in shards)})")
    return SplitInfo(num_samples, shards)


def load_manifest(root: str | os.PathLike) -> Manifest:
    """Read and validate {root}/_info.json (format_version 1 or 2); ManifestError names file and key."""
    root = Path(root).absolute()
    path = root / MANIFEST_NAME
    reader = _Reader(path)
    if root.exists() and not root.is_dir():
        raise ManifestError(f"{root} is a file, not a shard folder (give the folder that holds {MANIFEST_NAME})")
    if not root.exists():
        raise ManifestError(f"{root}: no such folder (convert first: python -m data_prep convert ...)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found (convert first: python -m data_prep convert ...)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path}: unreadable manifest: {error}") from None
    version = reader.get(raw, "format_version", int, "")
    if version not in READABLE_VERSIONS:
        raise reader.fail("format_version", f"expected one of {list(READABLE_VERSIONS)}, got {version}")
    classes, domains = reader.names(raw, "classes"), reader.names(raw, "domains")
    raw_splits = reader.get(raw, "splits", dict, "")
    if sorted(raw_splits) != sorted(domains):
        raise reader.fail("splits", f"domains {sorted(raw_splits)} differ from 'domains' {sorted(domains)}")
    splits = {}
    for domain in domains:
        per_domain = reader.get(raw_splits, domain, dict, "splits")
        if sorted(per_domain) != sorted(SPLITS):
            raise reader.fail(f"splits.{domain}", f"expected exactly the splits {list(SPLITS)}")
        splits[domain] = MappingProxyType({split: _split_info(reader, per_domain[split], f"splits.{domain}.{split}",
                                                              domain, split, version) for split in SPLITS})
    converter = reader.get(raw, "converter", dict, "")
    return Manifest(root=root, dataset=reader.get(raw, "dataset", str, ""), classes=classes, domains=domains,
                    splits=MappingProxyType(splits), converter=MappingProxyType(converter),
                    skipped=reader.count(raw, "skipped", ""), report=reader.get(raw, "report", str, ""),
                    format_version=version, no_val=_no_val(reader, raw))


def _no_val(reader: _Reader, raw: dict) -> tuple[tuple[str, str], ...]:
    """The "no_val" list, [[domain, class], ...]; manifests written before the val check lack it: ()."""
    pairs = raw.get("no_val", [])
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2
                                              and all(isinstance(x, str) for x in p) for p in pairs):
        raise reader.fail("no_val", "expected a list of [domain, class] pairs")
    return tuple((domain, name) for domain, name in pairs)
