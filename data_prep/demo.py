"""Demo shards on demand: synthesize the demo dataset and convert it with the real PACS converter.

    from data_prep.demo import ensure_demo_shards
    root = ensure_demo_shards(Path("~/.cache/rsc_dist").expanduser())   # -> .../demo-v1-64px-60per-seed0/shards
    manifest = load_manifest(root)

Idempotent and safe to call from several processes at once (an flock serializes them) or after an
interruption: the source set is written to a temporary folder and renamed when complete, the
conversion resumes, and a later call returns at once when a valid manifest for the same
parameters is there. Cost at the defaults (1440 images, 64 px): a few seconds on 2 cores.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from data_prep import DATA_PREP_VERSION
from data_prep.convert import convert
from data_prep.manifest import ManifestError, load_manifest
from data_prep.synth import SYNTH_MARKER, SYNTH_VERSION, write_demo_dataset

DEMO_SHARD_SAMPLES = 64  # several shards per domain and split, so multi-rank demo runs have shards to split
DEMO_IMAGES_PER_CLASS = 60


@contextmanager
def _exclusive(lock_file: Path):
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete_shards(shards: Path, src: Path) -> bool:
    try:
        manifest = load_manifest(shards)
    except ManifestError:
        return False
    args = manifest.converter.get("args", {})
    if (manifest.converter.get("data_prep_version") != DATA_PREP_VERSION or args.get("src") != str(src.absolute())
            or args.get("shard_samples") != DEMO_SHARD_SAMPLES):
        return False
    return all((manifest.root / s.file).is_file() and (manifest.root / s.file).stat().st_size == s.num_bytes
               for d in manifest.domains for split in manifest.splits[d] for s in manifest.shards(d, split))


def _ensure_source(base: Path, src: Path, *, image_size: int, images_per_class: int, seed: int) -> None:
    if (src / SYNTH_MARKER).is_file():
        return
    for leftover in base.glob(".src.*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    temporary = base / f".src.{os.getpid()}.tmp"
    write_demo_dataset(temporary, image_size=image_size, images_per_class=images_per_class, seed=seed)
    shutil.rmtree(src, ignore_errors=True)
    os.replace(temporary, src)


def ensure_demo_shards(cache_dir: str | Path, *, image_size: int = 64, images_per_class: int = DEMO_IMAGES_PER_CLASS,
                       seed: int = 0, workers: int = 2) -> Path:
    """Return the shard root of the demo dataset for these parameters, building it if needed."""
    base = Path(cache_dir).absolute() / f"demo-v{SYNTH_VERSION}-{image_size}px-{images_per_class}per-seed{seed}"
    src, shards = base / "src", base / "shards"
    base.mkdir(parents=True, exist_ok=True)
    with _exclusive(base / ".lock"):
        if not _complete_shards(shards, src):
            _ensure_source(base, src, image_size=image_size, images_per_class=images_per_class, seed=seed)
            convert("pacs", src, shards, shard_samples=DEMO_SHARD_SAMPLES, workers=workers, seed=seed, progress=False)
    return shards
