"""The ``data`` section of the config: what the data path (plan, order, streams, augment) reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rsc_dist.core.fields import setting


@dataclass(frozen=True)
class DataConfig:
    root: str = setting("demo", 'shard folder holding _info.json; "demo" = the built-in demo set')
    dataset: str = setting("", "dataset name for reports (default: the manifest's)")
    classes: tuple[str, ...] = setting((), "when set, the manifest's class list must equal it")
    target: tuple[str, ...] = setting((), "held-out domain(s), evaluated but never trained on")
    sources: tuple[str, ...] = setting((), "training domains (default: every domain not a target)")
    image_size: int = setting(222, "side of the square training/evaluation input", check="positive")
    batch_size: int = setting(
        64, "samples per process and step (x source domains with sampling=balanced)", check="positive")
    global_batch_size: int | None = setting(
        None, "samples per step over all processes (and source domains); when set, replaces batch_size "
        "and lets a run resume on any number of processes that divides it", check="positive")
    holdout_fraction: float = setting(
        0.0, "0: the shards' own train/val split; else DomainBed's holdout drawn at load time: this fraction "
        "of EVERY domain (all its splits pooled; floor(n x fraction), unstratified) is its validation "
        "(out) split, the rest its training (in) split; targets are reported on their in-split and their "
        "out-split feeds DomainBed's oracle", check="fraction")
    holdout_seed: int = setting(0, "seeds the holdout draw with data.holdout_fraction (DomainBed's trial seed)",
                                check="nonnegative")
    sampling: Literal["merged", "balanced"] = setting(
        "merged", "merged: sources pooled (released code); balanced: batch_size from each (DomainBed)")
    flip_double: bool = setting(False, "released recipe: each batch doubled with its mirror image")
    random_resized_crop_scale: tuple[float, float] = setting((0.8, 1.0), "RandomResizedCrop scale range")
    hflip: bool = setting(True, "random horizontal flip")
    color_jitter: float = setting(0.4, "ColorJitter strength (brightness, contrast, saturation, hue)",
                                  check="nonnegative")
    grayscale: float = setting(0.1, "RandomGrayscale probability", check="fraction")
    workers: int = setting(4, "loader worker processes per rank (0: load in the training process)",
                           check="nonnegative")
    decode: Literal["auto", "workers", "device"] = setting(
        "auto", "where JPEGs are decoded and augmented: workers (CPU), device (the training device, "
        "batched; workers only read bytes and draw the random parameters); auto: device on CUDA")
    shuffle_block_shards: int = setting(
        16, "shards whose samples are shuffled together in the global sample order", check="positive")
    eval_batch_size: int = setting(128, "samples per evaluation batch", check="positive")
    mean: tuple[float, float, float] = setting((0.485, 0.456, 0.406), "normalization mean (RGB, 0-1)")
    std: tuple[float, float, float] = setting((0.229, 0.224, 0.225), "normalization std (RGB, 0-1)")
