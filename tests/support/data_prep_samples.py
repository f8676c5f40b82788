"""Helpers for tests (tests/test_data_prep_*.py): tiny images of every kind, tiny source trees in
each published layout, and reading shards back. Nothing here is used by the converter itself.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.manifest import load_manifest
from data_prep.tarshard import iter_tar_samples


def _pixels(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write 16-bit RGB)."""
    height, width, _ = pixels.shape
    wide = pixels.astype(">u2") * 257
    raw = b"".join(b"\x00" + wide[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit RGB, with a few bytes of pixel data: a "pixel bomb"
    stand-in that costs nothing to write (decoding it would allocate width * height * 3 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000)))
            + chunk(b"IEND", b""))


def signal_dispositions(linger: float = 0.0) -> dict[str, object]:
    """In a pool worker: how SIGTERM, SIGINT and SIGUSR1 are handled there, and which are blocked.
    `linger` seconds of sleep first let every worker of a pool take one call."""
    import os
    import signal
    import time

    time.sleep(linger)
    names = ("SIGTERM", "SIGINT", "SIGUSR1")
    handlers = {name: signal.getsignal(getattr(signal, name)) for name in names}
    described = {name: ("SIG_DFL" if h == signal.SIG_DFL else "SIG_IGN" if h == signal.SIG_IGN
                        else "default_int_handler" if h is signal.default_int_handler else repr(h))
                 for name, h in handlers.items()}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    described["blocked"] = sorted(s.name for s in blocked if s.name in names)
    described["pid"] = os.getpid()
    return described


def image_bytes(kind: str = "jpeg", *, size: int = 16, seed: int = 0) -> bytes:
    """Encoded test images: good ones, ones needing care, and broken ones."""
    rgb = Image.fromarray(_pixels(size, seed))
    makers = {
        "jpeg": lambda: _encode(rgb, "JPEG", quality=90),
        "jpeg_progressive": lambda: _encode(rgb, "JPEG", quality=85, progressive=True),
        "jpeg_subsampled": lambda: _encode(rgb, "JPEG", quality=75, subsampling=2),
        "jpeg_gray": lambda: _encode(rgb.convert("L"), "JPEG"),
        "jpeg_cmyk": lambda: _encode(rgb.convert("CMYK"), "JPEG"),
        "png": lambda: _encode(rgb, "PNG"),
        "png_rgba": lambda: _encode(rgb.convert("RGBA"), "PNG"),
        "png_palette": lambda: _encode(rgb.convert("P"), "PNG"),
        "png_16bit": lambda: _png16(_pixels(size, seed)),
        "webp": lambda: _encode(rgb, "WEBP", lossless=True),
        "bmp": lambda: _encode(rgb, "BMP"),
        "tiff": lambda: _encode(rgb, "TIFF"),
        "tiff_cmyk": lambda: _encode(rgb.convert("CMYK"), "TIFF"),
        "gif": lambda: _encode(rgb.convert("P"), "GIF"),
        "gif_animated": lambda: _encode(rgb.convert("P"), "GIF", save_all=True,
                                        append_images=[Image.fromarray(_pixels(size, seed + 1)).convert("P")]),
        "jpeg_truncated": lambda: image_bytes("jpeg", size=size, seed=seed)[: 200],
        "png_truncated": lambda: image_bytes("png", size=size, seed=seed)[: 100],
        "empty": lambda: b"",
        "text": lambda: b"not an image, just some notes\n",
    }
    return makers[kind]()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_class_tree(root: Path, domains: list[str], classes: list[str], per_class: int, *, ext: str = "jpg",
                    name: str = "img{i}") -> dict[str, bytes]:
    """root/{domain}/{class}/{name}.{ext}; returns {path relative to root: bytes}."""
    kind = {"jpg": "jpeg", "JPEG": "jpeg", "png": "png", "webp": "webp"}[ext]
    written = {}
    for d, domain in enumerate(domains):
        for c, class_name in enumerate(classes):
            for i in range(per_class):
                relative = f"{domain}/{class_name}/{name.format(i=i)}.{ext}"
                written[relative] = write(root / relative, image_bytes(kind, seed=1000 * d + 10 * c + i)).read_bytes()
    return written


def make_pacs(src: Path, domains=("art_painting", "photo"), classes=("dog", "horse"), per_class: int = 4,
              *, test_extra: int = 1, images: str = "kfold", labels: str = ".") -> dict[str, bytes]:
    """PACS tree with split files: image 0 of each class -> crossval, the last `test_extra` only in
    test_kfold (so they become split "test"), the rest -> train; labels 1-based. `images` and `labels`
    are the folders (below src) of the images and the split files: the authors' kfold/ with the
    lists on top by default; images="pacs_data/pacs_data", labels="pacs_label" is pacs_data.zip and
    pacs_label.zip as they extract."""
    files = make_class_tree(src / images, list(domains), list(classes), per_class)
    (src / labels).mkdir(parents=True, exist_ok=True)
    for domain in domains:
        lines = {"train": [], "crossval": [], "test": []}
        for label, class_name in enumerate(classes, start=1):
            for i in range(per_class):
                line = f"{domain}/{class_name}/img{i}.jpg {label}"
                lines["test"].append(line)
                if i == 0:
                    lines["crossval"].append(line)
                elif i < per_class - test_extra:
                    lines["train"].append(line)
        for role, role_lines in lines.items():
            (src / labels / f"{domain}_{role}_kfold.txt").write_text("\n".join(role_lines) + "\n")
    return {(Path(images) / k).as_posix(): v for k, v in files.items()}


def make_domainnet(src: Path, domains=("clipart", "real"), classes=("The_Eiffel_Tower", "aircraft_carrier", "zebra"),
                   per_class: int = 3) -> dict[str, bytes]:
    """DomainNet tree; image 0 of each class in {domain}_test.txt, the rest in _train.txt, 0-based labels.
    The class order of the lists is deliberately not the sorted order of the folder names."""
    files = make_class_tree(src, list(domains), list(classes), per_class)
    label_of = {name: i for i, name in enumerate(reversed(classes))}
    for domain in domains:
        train, test = [], []
        for class_name in classes:
            for i in range(per_class):
                (test if i == 0 else train).append(f"{domain}/{class_name}/img{i}.jpg {label_of[class_name]}")
        (src / f"{domain}_train.txt").write_text("\n".join(train) + "\n")
        (src / f"{domain}_test.txt").write_text("\n".join(test) + "\n")
    return files


def corrupt_first_image(root: Path, domain: str, split: str = "train") -> Path:
    """Zero 64 bytes of the first image of a shard (the JPEG header; the shard's size and the
    manifest stay as they are, so only decoding finds it); returns the shard's path."""
    manifest = load_manifest(root)
    shard = manifest.shards(domain, split)[0]
    path = manifest.root / shard.file
    with open(path, "r+b") as handle:
        handle.seek(shard.sample_offsets[0] + 512)  # past the first member's tar header
        handle.write(b"\0" * 64)
    return path


def read_all_samples(root: Path) -> dict[str, dict]:
    """{src: sample} over every shard the manifest lists; sample has split and domain names added."""
    manifest = load_manifest(root)
    samples = {}
    for domain in manifest.domains:
        for split in manifest.splits[domain]:
            for path in manifest.shard_paths(domain, split):
                for sample in iter_tar_samples(path):
                    sample.update(split=split, domain=domain)
                    samples[sample["src"].decode()] = sample
    return samples


def image_of(sample: dict) -> bytes:
    return next(sample[ext] for ext in ("jpg", "png", "webp") if ext in sample)


def tree_bytes(root: Path, *, with_state: bool = True) -> dict[str, bytes]:
    """Every file below root, for byte-for-byte comparisons. The resume state (.data_prep/) records
    source mtimes, so it differs when the source was rewritten even if the shards do not."""
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return {name: data for name, data in files.items() if with_state or not name.startswith(".data_prep/")}
