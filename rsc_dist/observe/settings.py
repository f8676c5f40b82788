"""The ``wandb`` section of the config: what rsc_dist.observe reads to start and name a W&B run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rsc_dist.core.fields import setting


@dataclass(frozen=True)
class WandbConfig:
    project: str = setting("rsc_dist", "W&B project")
    entity: str | None = setting(None, "W&B entity (team or user)")
    group: str | None = setting(None, "W&B group (default: run.experiment)")
    job_type: str | None = setting(None, "W&B job type (default: the algorithm)")
    mode: Literal["auto", "online", "offline", "disabled"] = setting(
        "auto", "auto: online with an API key, else offline (WANDB_MODE wins)")
    tags: tuple[str, ...] = setting((), "extra W&B tags")
    log_model: Literal["off", "best"] = setting("off", "best: log the best checkpoint as a model artifact")
