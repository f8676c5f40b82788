"""Demo shards on demand: synthesize the demo dataset and convert it with the real PACS converter.

    from data_prep.demo import ensure_demo_shards
    root = ensure_demo_shards(Path("~/.cache/rsc_dist").expanduser())   # -> .../demo-v1-64px-60per-seed0/shards
    manifest = load_manifest(root)

Idempotent and safe to call from several processes at once (an flock on `{base}/.lock` serializes
them) or after an interruption: the source set is written to a temporary folder and renamed when
complete, the conversion resumes, and a later call returns at once when a valid, current manifest
for the same parameters is there (a version-1 manifest from an older data_prep is upgraded in
place with sample offsets). Cost at the defaults (1440 images, 64 px): a few seconds on 2 cores.

The lock is an flock on an open file: the kernel drops it when the holder dies, however it dies
(kill -9 included), and the converter's pool workers close their inherited copy of the descriptor
so they cannot keep it alive. A waiter gives up after `lock_timeout` seconds with DemoLockTimeout,
naming the lock file and the pid that holds it.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from data_prep import DATA_PREP_VERSION
from data_prep.convert import convert
from data_prep.index import index_manifest
from data_prep.manifest import MANIFEST_NAME, ManifestError, load_manifest
from data_prep.parallel import close_in_workers
from data_prep.synth import SYNTH_MARKER, SYNTH_VERSION, write_demo_dataset

DEMO_SHARD_SAMPLES = 64  # several shards per domain and split, so multi-rank demo runs have shards to split
DEMO_IMAGES_PER_CLASS = 60
DEMO_LOCK_TIMEOUT = 600.0  # seconds; building the default demo takes about 15 s on 2 cores


class DemoLockTimeout(TimeoutError):
    """Another process held the demo lock for longer than the timeout."""


@contextmanager
def _exclusive(lock_file: Path, timeout: float = DEMO_LOCK_TIMEOUT, poll: float = 0.1):
    with open(lock_file, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    raise DemoLockTimeout(
                        f"waited {timeout:g} s for the demo lock {lock_file} (held by pid {holder}); if no such "
                        "process is building the demo, something else has the file open with a lock") from None
                time.sleep(poll)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            with close_in_workers(handle.fileno()):
                yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _complete_manifest(shards: Path, src: Path):
    """The manifest when it is valid for these parameters and lists shards that are all there, else None."""
    try:
        manifest = load_manifest(shards)
    except ManifestError:
        return None
    args = manifest.converter.get("args", {})
    if (manifest.converter.get("data_prep_version") != DATA_PREP_VERSION or args.get("src") != str(src.absolute())
            or args.get("shard_samples") != DEMO_SHARD_SAMPLES):
        return None
    complete = all((manifest.root / s.file).is_file() and (manifest.root / s.file).stat().st_size == s.num_bytes
                   for d in manifest.domains for split in manifest.splits[d] for s in manifest.shards(d, split))
    return manifest if complete else None


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
                       seed: int = 0, workers: int = 2, lock_timeout: float = DEMO_LOCK_TIMEOUT) -> Path:
    """Return the shard root of the demo dataset for these parameters, building it if needed.

    Raises DemoLockTimeout when another process holds the lock for more than lock_timeout seconds.
    """
    base = Path(cache_dir).absolute() / f"demo-v{SYNTH_VERSION}-{image_size}px-{images_per_class}per-seed{seed}"
    src, shards = base / "src", base / "shards"
    base.mkdir(parents=True, exist_ok=True)
    with _exclusive(base / ".lock", lock_timeout):
        manifest = _complete_manifest(shards, src)
        if manifest is None:
            _ensure_source(base, src, image_size=image_size, images_per_class=images_per_class, seed=seed)
            # A cache moved from elsewhere lists its old src: the converter would refuse to replace
            # another source's conversion; this folder is the demo's own.
            (shards / MANIFEST_NAME).unlink(missing_ok=True)
            convert("pacs", src, shards, shard_samples=DEMO_SHARD_SAMPLES, workers=workers, seed=seed, progress=False)
        elif manifest.format_version < 2:  # cached by an older data_prep: add the sample offsets in place
            try:
                index_manifest(shards, progress=False)
            except ManifestError:
                _ensure_source(base, src, image_size=image_size, images_per_class=images_per_class, seed=seed)
                convert("pacs", src, shards, shard_samples=DEMO_SHARD_SAMPLES, workers=workers, seed=seed,
                        progress=False)
    return shards
