"""Checkpoints of a run folder: atomic saves that keep the last K, and which one to resume.

Layout: RUN/checkpoints/checkpoint_STEP/ (8-digit step), written as .tmp_checkpoint_STEP/ and
renamed once every rank has saved, so a complete-looking folder is always complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from rsc_dist.config import ConfigError
from rsc_dist.contracts import PREEMPTED_MARKER

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d{8})$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int) -> Path:
    """``save_state`` into a temporary folder, renamed when every rank is done; keep the last K."""
    root = run_dir / "checkpoints"
    final = root / f"checkpoint_{step:08d}"
    temporary = root / f".tmp_checkpoint_{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_resume_checkpoint(resume: str, run_dir: Path) -> Path | None:
    if resume == "none":
        return None
    if resume == "auto":
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such checkpoint folder")
    return path


def mark_preempted(accelerator, run_dir: Path, step: int, reason: str) -> None:
    if accelerator.is_main_process:
        (run_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": step, "reason": reason}) + "\n")
