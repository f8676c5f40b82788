"""The demo dataset: procedurally drawn objects in four styles, written in the PACS layout.

    python -m data_prep synth --out /tmp/demo_src [--image-size 64] [--images-per-class 60] [--seed 0]
    python -m data_prep convert --format pacs --src /tmp/demo_src --out /tmp/demo_shards

Output (the real PACS converter reads it, so the demo exercises the real path):
    {out}/kfold/{cartoon,painting,photo,sketch}/{car,fish,house,star,tree,umbrella}/{domain}_{class}_NNNN.jpg
    {out}/{domain}_train_kfold.txt, {domain}_crossval_kfold.txt (20% of each class), {domain}_test_kfold.txt (all)
    {out}/_synth.json  (parameters; written last, so its presence means the set is complete)
Defaults: 6 classes x 4 domains x 60 = 1440 JPEGs of 64 px. Every image depends only on
(seed, domain, class, index): the same call gives the same files, byte for byte.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.synth_shapes import CLASSES, place_object
from data_prep.synth_styles import STYLES

SYNTH_VERSION = 1  # bump when the pictures change
DOMAINS = ("photo", "cartoon", "sketch", "painting")
SYNTH_MARKER = "_synth.json"
VAL_FRACTION = 0.2
JPEG_QUALITY = 90


def render_image(domain: str, class_name: str, index: int, *, image_size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng([seed, DOMAINS.index(domain), CLASSES.index(class_name), index])
    canvas = 2 * image_size  # draw at twice the size and downsample: smooth edges without antialiasing support
    image = STYLES[domain](place_object(class_name, canvas, rng), canvas, class_name, rng)
    return image.resize((image_size, image_size), Image.LANCZOS)


def _split_lines(domain: str, files: dict[str, list[str]], seed: int) -> dict[str, list[str]]:
    lines = {"train": [], "crossval": [], "test": []}
    for label, class_name in enumerate(CLASSES, start=1):  # PACS labels are 1-based
        names = sorted(files[class_name])
        held_out = set(random.Random(f"synth-split:{seed}:{domain}:{class_name}").sample(
            names, round(VAL_FRACTION * len(names))))
        for name in names:
            line = f"{domain}/{class_name}/{name} {label}"
            lines["crossval" if name in held_out else "train"].append(line)
            lines["test"].append(line)
    return lines


def write_demo_dataset(out: str | Path, *, image_size: int = 64, images_per_class: int = 60, seed: int = 0) -> Path:
    if image_size < 8 or images_per_class < 2:
        raise ValueError("image_size must be >= 8 and images_per_class >= 2")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    for domain in DOMAINS:
        files: dict[str, list[str]] = {}
        for class_name in CLASSES:
            folder = out / "kfold" / domain / class_name
            folder.mkdir(parents=True, exist_ok=True)
            files[class_name] = []
            for index in range(images_per_class):
                name = f"{domain}_{class_name}_{index:04d}.jpg"
                render_image(domain, class_name, index, image_size=image_size, seed=seed).save(
                    folder / name, format="JPEG", quality=JPEG_QUALITY)
                files[class_name].append(name)
        for role, lines in _split_lines(domain, files, seed).items():
            (out / f"{domain}_{role}_kfold.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    params = {"synth_version": SYNTH_VERSION, "image_size": image_size, "images_per_class": images_per_class,
              "seed": seed, "domains": list(DOMAINS), "classes": CLASSES}
    (out / SYNTH_MARKER).write_text(json.dumps(params, indent=1) + "\n", encoding="utf-8")
    return out
