"""Which tracker a run logs to (W&B, TensorBoard or none) and who its W&B run is: mode, run id
kept across requeues and resumes, name, tags and the run config (resolved config, git commit,
fingerprint, derived sizes, provenance)."""

from __future__ import annotations

import hashlib
import json
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from rsc_dist.config import Config, flatten, to_dict, trajectory_fingerprint
from rsc_dist.observe.provenance import git_commit

RUN_ID_FILE = Path("wandb") / "run_id"  # in the run folder: the W&B run id a start used


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_mode_from_environment() -> str:
    """online | offline | disabled as the environment asks: WANDB_MODE when it names a mode
    (any case; "dryrun" is offline), else online with an API key, else offline. The trainer's
    wandb.mode=auto and `python -m rsc_dist.results` both decide this way."""
    env = os.environ.get("WANDB_MODE", "").lower()
    if env in ("online", "offline", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    return "online" if wandb_api_key_configured() else "offline"


def wandb_mode(config: Config) -> str:
    """online | offline | disabled. "auto" honours WANDB_MODE, else offline without a key."""
    if config.wandb.mode != "auto":
        return config.wandb.mode
    return wandb_mode_from_environment()


def tracker_name(config: Config) -> str | None:
    """What to pass as Accelerator(log_with=...): "wandb", "tensorboard" or None (console only).

    train.tracker=wandb with W&B disabled (wandb.mode=disabled or WANDB_MODE=disabled) is None.
    """
    tracker = config.train.tracker
    if tracker == "tensorboard":
        return "tensorboard"
    if tracker == "none" or wandb_mode(config) == "disabled":
        return None
    return "wandb"


def wandb_run_id(run_dir: Path) -> str:
    """Stable per run folder, so a requeued or resumed job continues the same W&B run.

    WANDB_RUN_ID (set by `wandb agent` for a sweep trial) wins; otherwise the id a previous
    start of this run folder recorded in RUN/wandb/run_id (so a sweep trial resumed outside
    the agent continues its sweep run); otherwise a hash of the folder.
    """
    env = os.environ.get("WANDB_RUN_ID")
    if env:
        return env
    try:
        stored = (Path(run_dir) / RUN_ID_FILE).read_text().strip()
    except OSError:
        stored = ""
    return stored or hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]


def remember_run_id(run_dir: Path, run_id: str) -> None:
    try:
        path = Path(run_dir) / RUN_ID_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    except OSError:
        pass


def dataset_name(config: Config, plan) -> str:
    return config.data.dataset or plan.manifest.dataset


def run_tags(config: Config, plan) -> list[str]:
    """User tags, then dataset, target:<domain> per target, arch, algorithm (deduplicated,
    W&B's 64-character limit)."""
    tags = list(config.wandb.tags) + [dataset_name(config, plan)]
    tags += [f"target:{t}" for t in plan.targets] + [config.model.arch, config.algorithm]
    seen = []
    for tag in tags:
        tag = str(tag)[:64]
        if tag and tag not in seen:
            seen.append(tag)
    return seen


def run_config(config: Config, plan, accelerator, provenance: dict | None = None) -> dict:
    """The W&B run config: the resolved config, the git commit, the fingerprint, derived sizes and
    the run's provenance (rsc_dist.observe.provenance: as results.json records it, so far)."""
    values = to_dict(config)
    values["git_commit"] = git_commit()
    if provenance is not None:
        values["provenance"] = provenance
    values["fingerprint"] = trajectory_fingerprint(config, accelerator.num_processes)
    values["derived"] = {"world_size": accelerator.num_processes, "steps_per_epoch": plan.steps_per_epoch,
                         "total_steps": plan.total_steps, "sources": list(plan.sources),
                         "targets": list(plan.targets), "dataset": dataset_name(config, plan),
                         "num_classes": len(plan.manifest.classes),
                         "global_batch": plan.global_batch, "global_forward_batch": plan.global_forward_batch}
    return values


def tensorboard_hparams(values: dict) -> dict:
    """The run config as TensorBoard's hparams, which take scalars and strings only: dotted
    keys, any other value (a list, None) as its JSON text."""
    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in flatten(values).items()}
