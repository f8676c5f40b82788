"""The ``averaging`` section of the config: the parameters of the weight average that
``train.averaging`` switches on (rsc_dist.averaging; docs/method.md, "Weight averaging")."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from rsc_dist.core.errors import ConfigError
from rsc_dist.core.fields import setting

KINDS = ("none", "ema", "swa", "swad")
LABELS = {"ema": "EMA", "swa": "SWA", "swad": "SWAD"}  # how tables name an averaged model's rows


@dataclass(frozen=True)
class AveragingConfig:
    ema_decay: float = setting(0.999, "ema: the decay once warmed up (timm ModelEmaV3's decay)", check="fraction")
    ema_warmup: bool = setting(
        True, "ema: the decay grows as 1 - (1 + t / gamma)^-power up to ema_decay, t = optimizer updates "
        "(timm's use_warmup)")
    ema_warmup_gamma: float = setting(1.0, "ema: the warm-up's gamma (timm's warmup_gamma)")
    ema_warmup_power: float = setting(0.75, "ema: the warm-up's power (timm's warmup_power; 3/4 for runs "
                                            "of fewer than ~100k updates)")
    ema_start_step: int = setting(0, "ema: optimizer updates during which the average only copies the "
                                     "weights (timm's update_after_step)", check="nonnegative")
    swa_start_step: int = setting(0, "swa: the uniform average takes the weights after every training step "
                                     "from this one on (ERM++: 600)", check="nonnegative")
    swad_n_converge: int = setting(3, "swad: evaluations in the window that detects where the validation "
                                      "loss stops falling (the authors' n_converge)", check="positive")
    swad_n_tolerance: int = setting(6, "swad: evaluations whose smallest validation loss decides whether "
                                       "the valley goes on (the authors' n_tolerance)", check="positive")
    swad_tolerance_ratio: float = setting(0.3, "swad: the valley ends when the loss stays above (1 + ratio) x "
                                               "the converged loss (the authors' tolerance_ratio)",
                                          check="nonnegative")
    swad_early_stop: bool = setting(True, "swad: stop training when the loss valley ends (the authors do)")
    bn_batches: int = setting(
        50, "global batches of source training data on which an averaged model's BatchNorm statistics are "
        "recomputed (model.freeze_bn=false; with frozen BatchNorm there is nothing to recompute)",
        check="positive")


def inactive_keys(kind: str) -> tuple[str, ...]:
    """Dotted keys (or section prefixes) of the averaging settings that do not shape the run with
    ``train.averaging=kind``: the whole switch and section without averaging (runs from before
    averaging existed keep their fingerprint), another kind's parameters otherwise."""
    if kind == "none":
        return ("train.averaging", "averaging")
    others = tuple(f"{k}_" for k in KINDS if k not in ("none", kind))
    return tuple(f"averaging.{f.name}" for f in dataclasses.fields(AveragingConfig) if f.name.startswith(others))


def check(kind: str, settings: AveragingConfig) -> None:
    """Cross-field rules the field checks cannot say (ConfigError, exit 2)."""
    if kind == "ema" and settings.ema_warmup:
        for key in ("ema_warmup_gamma", "ema_warmup_power"):
            if getattr(settings, key) <= 0:
                raise ConfigError(f"averaging.{key} must be > 0; got {getattr(settings, key)}")
