"""The trainer's sections of the config: ``run`` (identity and seed), ``optim`` and ``schedule``
(rsc_dist.trainer.optim), ``train`` (the loop, checkpoints, stops, precision, selection)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rsc_dist.core import protocols
from rsc_dist.core.fields import setting


@dataclass(frozen=True)
class RunConfig:
    experiment: str = setting("default", "W&B group of a sweep; part of the default output folder")
    name: str | None = setting(None, "W&B run name (default ALGORITHM-TARGET-seedS)")
    output_dir: str | None = setting(
        None, "run folder (default runs/EXPERIMENT/ALGORITHM/TARGET/seedS-FINGERPRINT)")
    seed: int = setting(0, "seeds the model init, the sample order, augmentation and RSC draws")
    protocol: Literal[protocols.NAMES] = setting(
        "custom", "the published protocol the settings follow, recorded in results.json: "
        + "; ".join(f"{name}: {meaning}" for name, meaning in protocols.VERSIONS.items()))


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adam"] = setting("sgd", "optimizer")
    lr: float = setting(0.01, "base learning rate")
    momentum: float = setting(0.9, "SGD momentum", check="nonnegative")
    nesterov: bool = setting(False, "SGD Nesterov momentum")
    weight_decay: float = setting(5e-4, "L2 weight decay", check="nonnegative")
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam betas")


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["step", "cosine", "constant"] = setting("step", "learning-rate schedule after warmup")
    warmup_steps: int = setting(0, "linear warmup, in optimizer steps", check="nonnegative")
    milestones: tuple[float, ...] = setting((0.8,), "step decay points, as fractions of all steps")
    gamma: float = setting(0.1, "step decay factor")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(30, "epochs (ignored when max_steps is set)", check="positive")
    steps_per_epoch: int | None = setting(None, "default: source training samples // global batch")
    max_steps: int | None = setting(None, "when set, replaces epochs x steps_per_epoch")
    grad_accum: int = setting(1, "gradient accumulation steps per optimizer step", check="positive")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = setting(
        "auto", "auto: what accelerate launch says; no | bf16 | fp16 autocast")
    eval_every_steps: int | None = setting(None, "default: at the end of every epoch")
    checkpoint_every_steps: int | None = setting(None, "default: at the end of every epoch")
    keep_checkpoints: int = setting(2, "how many recent checkpoints to keep", check="positive")
    log_every_steps: int = setting(10, "metrics logging period", check="positive")
    image_log_every_steps: int = setting(200, "input grid with RSC masks; 0 disables", check="nonnegative")
    agree_every_steps: int = setting(
        10, "ranks agree on stop signals and non-finite loss this often", check="positive")
    stop_at_step: int | None = setting(None, "act as if preempted after this step (tests resume paths)")
    tracker: Literal["wandb", "tensorboard", "none"] = setting("wandb", "where metrics go besides the console")
    cpu_threads: int | None = setting(
        None, "intra-op CPU threads per rank on a CPU device; default: the cores this process may use "
        "divided by the ranks on its node (OMP_NUM_THREADS is not read: accelerate launch sets it to 1). "
        "Runs with other counts round float sums differently", check="positive")
    selection: Literal["source_val_pooled", "source_val_mean", "last"] = setting(
        "source_val_pooled", "which evaluation is best (checkpoints/best/): source_val_pooled = correct/total "
        "over all source val samples (released code); source_val_mean = mean of the per-source val "
        "accuracies (DomainBed's training-domain validation); last = the last evaluation")
    averaging: Literal["none", "ema", "swa", "swad"] = setting(
        "none", "a weight average evaluated beside the trained model (parameters: averaging.*): ema = "
        "exponential moving average (timm); swa = uniform from averaging.swa_start_step; swad = dense "
        "average over the loss valley of the source validation loss (Cha et al. 2021)")
