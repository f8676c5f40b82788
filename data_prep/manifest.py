"""The shard manifest `{root}/_info.json`: writing it atomically, and the reader the trainer uses.

    from data_prep.manifest import load_manifest, ManifestError
    manifest = load_manifest("/data/shards/pacs")
    manifest.classes, manifest.domains                 # one class order for all domains
    manifest.shard_paths("photo", "train")             # absolute Paths, in order
    manifest.num_samples("photo", "val")               # 0 for an empty split
    manifest.num_samples("photo")                      # whole domain (train + val + test)
    manifest.domain_index("photo")                     # the `dom` value stored in its samples

Layout of the file (format_version 1):
    {"format_version": 1, "dataset": "pacs", "classes": [...], "domains": [...],
     "splits": {"<domain>": {"train"|"val"|"test": {"num_samples": N,
                 "shards": [{"file": "<domain>/<split>-000000.tar", "num_samples": n,
                             "num_bytes": b, "sha256": "..."}]}}},
     "converter": {"format": ..., "args": {...}, "data_prep_version": ...},
     "skipped": <count>, "report": "_report.json"}
Every domain lists all three splits; an empty split has num_samples 0 and no shards.
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
FORMAT_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(Exception):
    """A missing or invalid manifest; the message names the file and the key at fault."""


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the root, posix
    num_samples: int
    num_bytes: int
    sha256: str


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


def _shard(reader: _Reader, raw: Any, where: str, domain: str, split: str) -> ShardInfo:
    file = reader.get(raw, "file", str, where)
    path = PurePosixPath(file)
    if path.is_absolute() or ".." in path.parts or path.parts[:1] != (domain,) or not path.name.startswith(f"{split}-"):
        raise reader.fail(f"{where}.file", f"{file!r} is not {domain}/{split}-NNNNNN.tar inside the root")
    sha256 = reader.get(raw, "sha256", str, where)
    if not _SHA256.match(sha256):
        raise reader.fail(f"{where}.sha256", "expected 64 lowercase hex digits")
    return ShardInfo(file, reader.count(raw, "num_samples", where), reader.count(raw, "num_bytes", where), sha256)


def _split_info(reader: _Reader, raw: Any, where: str, domain: str, split: str) -> SplitInfo:
    num_samples = reader.count(raw, "num_samples", where)
    shards = tuple(_shard(reader, shard, f"{where}.shards[{i}]", domain, split)
                   for i, shard in enumerate(reader.get(raw, "shards", list, where)))
    if sum(s.num_samples for s in shards) != num_samples:
        raise reader.fail(f"{where}.num_samples", f"{num_samples} != sum over its shards "
                                                  f"({sum(s.num_samples for s in shards)})")
    return SplitInfo(num_samples, shards)


def load_manifest(root: str | os.PathLike) -> Manifest:
    root = Path(root).absolute()
    path = root / MANIFEST_NAME
    reader = _Reader(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found (convert first: python -m data_prep convert ...)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(f"{path}: unreadable manifest: {error}") from None
    if reader.get(raw, "format_version", int, "") != FORMAT_VERSION:
        raise reader.fail("format_version", f"expected {FORMAT_VERSION}, got {raw['format_version']}")
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
                                                              domain, split) for split in SPLITS})
    converter = reader.get(raw, "converter", dict, "")
    return Manifest(root=root, dataset=reader.get(raw, "dataset", str, ""), classes=classes, domains=domains,
                    splits=MappingProxyType(splits), converter=MappingProxyType(converter),
                    skipped=reader.count(raw, "skipped", ""), report=reader.get(raw, "report", str, ""))
