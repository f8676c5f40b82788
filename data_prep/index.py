"""Upgrade a version-1 manifest to version 2 in place: add every shard's sample offsets.

    python -m data_prep index /data/shards/pacs

Reads only tar headers (tarfile seeks over member data), so it is fast even for large roots. The
new manifest is written atomically; a manifest that is already version 2 is left untouched.
Shards are not checked beyond what the offsets need (count and size); run verify for that.
"""
from __future__ import annotations

import json
import os
import sys
import tarfile

from tqdm import tqdm

from data_prep.manifest import FORMAT_VERSION, MANIFEST_NAME, ManifestError, load_manifest, write_json_atomic
from data_prep.tarshard import scan_sample_offsets


def index_manifest(root: str | os.PathLike, *, progress: bool = True) -> int | None:
    """Add sample offsets to a version-1 manifest; return how many shards were scanned (None: already current).

    Raises ManifestError naming the shard when one is missing or does not match its manifest entry.
    """
    manifest = load_manifest(root)  # validates the whole file first
    if manifest.format_version == FORMAT_VERSION:
        return None
    path = manifest.root / MANIFEST_NAME
    raw = json.loads(path.read_text(encoding="utf-8"))
    entries = [shard for domain in raw["splits"].values() for split in domain.values() for shard in split["shards"]]
    for entry in tqdm(entries, unit="shard", desc="index", file=sys.stderr, disable=not progress):
        shard = manifest.root / entry["file"]
        try:
            size = shard.stat().st_size
            offsets = scan_sample_offsets(shard)
        except (OSError, tarfile.TarError, EOFError, ValueError) as error:
            raise ManifestError(f"{shard}: cannot scan sample offsets: {error}") from None
        if size != entry["num_bytes"] or len(offsets) != entry["num_samples"] + 1:
            raise ManifestError(f"{shard}: {len(offsets) - 1} samples and {size} bytes on disk, the manifest lists "
                                f"{entry['num_samples']} and {entry['num_bytes']} (run python -m data_prep verify)")
        entry["sample_offsets"] = offsets
    raw["format_version"] = FORMAT_VERSION
    write_json_atomic(path, raw)
    load_manifest(manifest.root)  # what was written must read back
    return len(entries)
