"""Re-read every shard a manifest lists and check it against the manifest.

    python -m data_prep verify /data/shards/pacs            # sha256, counts, fields, ranges, offsets
    python -m data_prep verify /data/shards/pacs --decode   # + decode every image as the trainer does

Each fault is one line naming the shard (and the sample key where it applies):
missing shard, truncated (fewer bytes than listed), size mismatch, sha256 mismatch (tampered),
unreadable tar, wrong sample count, sample offsets that differ from the tar's headers (format
version 2), missing/unknown fields, cls or dom out of range, duplicate keys, images over the pixel
limit (refused from the header, never decoded) and images that do not decode to RGB uint8.
Exit status 0 only when there is no fault.
"""
from __future__ import annotations

import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data_prep.images import MAX_PIXELS, SHARD_IMAGE_EXTENSIONS, check_pixels, decode_rgb
from data_prep.manifest import Manifest, ShardInfo, load_manifest
from data_prep.parallel import unordered_map
from data_prep.shard_writer import file_sha256
from data_prep.tarshard import iter_tar_samples, scan_sample_offsets

REQUIRED_FIELDS = ("cls", "dom", "src")
MAX_SAMPLE_FAULTS_PER_SHARD = 10


@dataclass(frozen=True)
class ShardCheck:
    root: Path
    shard: ShardInfo
    domain_index: int
    num_classes: int
    decode: bool
    max_pixels: int = MAX_PIXELS


def _decimal(value: bytes) -> int | None:
    text = value.decode("ascii", errors="replace")
    return int(text) if text.isdigit() else None


def _sample_faults(sample: dict, check: ShardCheck) -> list[str]:
    key = sample["__key__"]
    faults = []
    images = [ext for ext in SHARD_IMAGE_EXTENSIONS if ext in sample]
    unknown = sorted(set(sample) - {"__key__", *SHARD_IMAGE_EXTENSIONS, *REQUIRED_FIELDS})
    if len(images) != 1:
        faults.append(f"sample {key}: expected one image (jpg/png/webp), found {images}")
    if unknown:
        faults.append(f"sample {key}: unexpected fields {unknown}")
    missing = [name for name in REQUIRED_FIELDS if name not in sample]
    if missing:
        return faults + [f"sample {key}: missing fields {missing}"]
    label, domain = _decimal(sample["cls"]), _decimal(sample["dom"])
    if label is None or not 0 <= label < check.num_classes:
        faults.append(f"sample {key}: cls {sample['cls']!r} is not in 0..{check.num_classes - 1}")
    if domain != check.domain_index:
        faults.append(f"sample {key}: dom {sample['dom']!r} but the shard belongs to domain {check.domain_index}")
    try:
        if not sample["src"].decode("utf-8"):
            faults.append(f"sample {key}: empty src")
    except UnicodeDecodeError:
        faults.append(f"sample {key}: src is not UTF-8")
    if check.decode and len(images) == 1:
        data = sample[images[0]]
        try:
            check_pixels(data, check.max_pixels)  # from the header: a pixel bomb is never decoded
        except ValueError as error:
            if str(error).startswith("too_many_pixels"):
                return faults + [f"sample {key}: {images[0]} refused without decoding: {error}"]
            # an unreadable header: the decoder below names the problem
        try:
            decode_rgb(data)  # raises unless uint8 (3, H, W) RGB
        except ValueError as error:
            faults.append(f"sample {key}: {error}")
    return faults


def _offset_faults(path: Path, shard: ShardInfo) -> list[str]:
    """Version 2: the manifest's sample offsets must be the tar's (headers only, no image data read)."""
    if shard.sample_offsets is None:
        return []
    try:
        actual = scan_sample_offsets(path)
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        return [f"{shard.file}: cannot scan sample offsets: {error}"]
    expected = list(shard.sample_offsets)
    if actual == expected:
        return []
    if len(actual) != len(expected):
        return [f"{shard.file}: sample offsets: the tar has {len(actual) - 1} samples, the manifest lists offsets "
                f"for {len(expected) - 1}"]
    first = next(i for i, (a, e) in enumerate(zip(actual, expected)) if a != e)
    return [f"{shard.file}: sample offsets differ from the tar from sample {first} on: "
            f"manifest {expected[first]}, tar {actual[first]}"]


def check_shard(check: ShardCheck) -> tuple[str, list[str], list[str]]:
    """(shard file, faults, sample keys) of one shard."""
    shard, path = check.shard, check.root / check.shard.file
    if not path.is_file():
        return shard.file, [f"{shard.file}: missing shard (listed in the manifest, not on disk)"], []
    faults = []
    size = path.stat().st_size
    if size < shard.num_bytes:
        faults.append(f"{shard.file}: truncated: {size} bytes on disk, manifest lists {shard.num_bytes}")
    elif size > shard.num_bytes:
        faults.append(f"{shard.file}: size mismatch: {size} bytes on disk, manifest lists {shard.num_bytes}")
    digest = file_sha256(path)
    if digest != shard.sha256:
        faults.append(f"{shard.file}: sha256 mismatch (tampered or corrupted): {digest} != manifest {shard.sha256}")
    keys, sample_faults = [], []
    try:
        for sample in iter_tar_samples(path):
            keys.append(sample["__key__"])
            sample_faults += _sample_faults(sample, check)
    except (tarfile.TarError, EOFError, OSError) as error:
        faults.append(f"{shard.file}: unreadable tar after {len(keys)} samples: {error}")
    else:
        faults += _offset_faults(path, shard)
    if len(keys) != shard.num_samples:
        faults.append(f"{shard.file}: {len(keys)} samples read, manifest lists {shard.num_samples}")
    extra = len(sample_faults) - MAX_SAMPLE_FAULTS_PER_SHARD
    faults += [f"{shard.file}: {fault}" for fault in sample_faults[:MAX_SAMPLE_FAULTS_PER_SHARD]]
    if extra > 0:
        faults.append(f"{shard.file}: ... and {extra} more sample faults")
    return shard.file, faults, keys


def _checks(manifest: Manifest, decode: bool, max_pixels: int) -> list[ShardCheck]:
    return [ShardCheck(manifest.root, shard, manifest.domain_index(domain), manifest.num_classes, decode, max_pixels)
            for domain in manifest.domains for split in manifest.splits[domain]
            for shard in manifest.shards(domain, split)]


def _duplicate_key_faults(keys_by_shard: list[tuple[str, list[str]]]) -> list[str]:
    first_shard: dict[str, str] = {}
    faults = []
    for file, keys in sorted(keys_by_shard):
        for key in keys:
            if key in first_shard:
                faults.append(f"{file}: duplicate key {key} (also in {first_shard[key]})")
            else:
                first_shard[key] = file
    return faults[:20] + ([f"... and {len(faults) - 20} more duplicate keys"] if len(faults) > 20 else [])


def verify(root: str | Path, *, decode: bool = False, workers: int = 1, progress: bool = True,
           max_pixels: int = MAX_PIXELS) -> list[str]:
    """All faults found under root (an empty list means the shards match the manifest).

    Raises data_prep.manifest.ManifestError when the manifest itself is missing or invalid.
    """
    manifest = load_manifest(root)
    checks = _checks(manifest, decode, max_pixels)
    results = []
    with tqdm(total=len(checks), unit="shard", desc="verify", file=sys.stderr, disable=not progress) as bar, \
            unordered_map(workers, len(checks)) as imap:
        for result in imap(check_shard, checks):
            results.append(result)
            bar.update()
    results.sort()
    return [fault for _, faults, _ in results for fault in faults] + _duplicate_key_faults(
        [(file, keys) for file, _, keys in results])
