"""Converter throughput on this machine: images/s and MB/s (source bytes) for 1 and N workers.

    python -m data_prep.bench_convert [--images 1000] [--sizes 64,384] [--workers 1,2]

Sources are written first (not timed) as an imagefolder tree of JPEGs with photo-like statistics
(smooth colour fields plus fine noise), then converted with the real converter, every image
decoded once by the trainer's decode call. The whole convert() call is timed: scan, plan, decode
check, tar writing, sha256, manifest. Prints a markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.convert import convert
from data_prep.images import decode_rgb


def write_photo_like_jpegs(root: Path, *, count: int, size: int, seed: int = 0) -> int:
    """count JPEGs in root/{domain}/{class}/; returns their total bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for index in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
        path = root / f"domain{index % 2}" / f"class{index % 5}" / f"img{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
        total += path.stat().st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--sizes", default="64,384")
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    decode_rgb(_tiny_jpeg())  # import torch before timing anything
    print(f"{datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()}, "
          f"python -m data_prep.bench_convert --images {args.images} --sizes {args.sizes} --workers {args.workers}")
    print("| image size | images | source MB | workers | seconds | images/s | MB/s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for size in map(int, args.sizes.split(",")):
            src = Path(scratch) / f"src{size}"
            source_bytes = write_photo_like_jpegs(src, count=args.images, size=size)
            for workers in map(int, args.workers.split(",")):
                out = Path(scratch) / f"out{size}_{workers}"
                started = time.perf_counter()
                summary = convert("imagefolder", src, out, workers=workers, progress=False)
                seconds = time.perf_counter() - started
                assert summary.num_samples == args.images
                print(f"| {size} px | {args.images} | {source_bytes / 1e6:.1f} | {workers} | {seconds:.2f} | "
                      f"{args.images / seconds:.0f} | {source_bytes / 1e6 / seconds:.1f} |", flush=True)
                shutil.rmtree(out)


def _tiny_jpeg() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    return buffer.getvalue()


if __name__ == "__main__":
    main()
