"""What computed a run: its ranks, nodes, CPU threads, devices, library versions, the code's commit
(and whether it had local changes), when it ran, and for a run that was stopped and resumed
(possibly on another number of ranks) each segment's step range and layout.

results.json holds it as "provenance" (layout: rsc_dist/core/contracts.py, PROVENANCE_RECORD and
SEGMENT_RECORD); the W&B run config carries the same. Library versions are read from the
installed packages' metadata: nothing is imported (a run that does not use DeepSpeed never
imports it).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess
from collections import Counter
from functools import lru_cache
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
LIBRARIES = ("torch", "torchvision", "accelerate", "deepspeed", "webdataset", "timm", "numpy", "wandb")
# Untracked files here are code the run may have imported; elsewhere (runs, notes) they are not.
CODE_FOLDERS = ("rsc_dist/", "data_prep/", "launch/")


def now() -> str:
    """The current time, ISO 8601 with the UTC offset, to the second."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def library_versions() -> dict:
    """{"python": ..., each of LIBRARIES: its installed version or None, "cuda": torch's CUDA}."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@lru_cache(maxsize=None)
def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """HEAD of the checkout the code runs from; None outside git (never raises)."""
    commit = (_git(repo, "rev-parse", "HEAD") or "").strip()
    return commit if len(commit) >= 7 else None


@lru_cache(maxsize=None)
def code_state(repo: Path = REPO_ROOT) -> dict:
    """{"commit": HEAD or None, "dirty": whether the checkout differs from it, None outside git}.
    Dirty: a tracked file changed (staged or not), or an untracked file in CODE_FOLDERS."""
    commit = git_commit(repo)
    status = _git(repo, "status", "--porcelain=v1", "--untracked-files=all") if commit else None
    if status is None:
        return {"commit": commit, "dirty": None}
    changed = [line for line in status.splitlines() if line.strip()]
    dirty = any(not line.startswith("??") or line[3:].startswith(CODE_FOLDERS) for line in changed)
    return {"commit": commit, "dirty": dirty}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model (/proc/cpuinfo) with "cpu" for a CPU device."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    model = model or platform.processor()
    return f"{device.type}: {model}" if model else device.type


def rank_facts(accelerator) -> dict:
    """This rank's host, device, CPU threads and ranks on its node."""
    return {"host": socket.gethostname(), "device": device_name(accelerator.device),
            "device_type": accelerator.device.type, "threads": torch.get_num_threads(),
            "local_ranks": int(os.environ.get("LOCAL_WORLD_SIZE", "1"))}


def gather_rank_facts(accelerator) -> list[dict]:
    """Every rank's rank_facts, in rank order. A collective: call on every rank."""
    mine = rank_facts(accelerator)
    if accelerator.num_processes == 1:
        return [mine]
    everyone = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def _hosts(ranks: list[dict]) -> list[str]:
    return list(dict.fromkeys(rank["host"] for rank in ranks))


def _threads(ranks: list[dict]) -> int | list[int]:
    """One count when every rank has it (the usual case), else each rank's."""
    counts = [rank["threads"] for rank in ranks]
    return counts[0] if len(set(counts)) == 1 else counts


def new_segment(step: int, ranks: list[dict]) -> dict:
    """The record of a start (or resume) at ``step`` on ``ranks`` (SEGMENT_RECORD); its end is
    moved on at every checkpoint (TrainState.reach)."""
    started = now()
    return {"start_step": step, "end_step": step, "world_size": len(ranks), "threads_per_rank": _threads(ranks),
            "device_type": ranks[0]["device_type"], "hosts": _hosts(ranks), "commit": code_state()["commit"],
            "started": started, "ended": started}


def unrecorded_segment(end_step: int) -> dict:
    """Steps 0..end_step of a checkpoint written before segments were recorded: layout unknown."""
    return {"start_step": 0, "end_step": end_step, "world_size": None, "threads_per_rank": None,
            "device_type": None, "hosts": None, "commit": None, "started": None, "ended": None}


def provenance_record(ranks: list[dict], segments: list[dict], threads_rule: str, ended: str | None = None) -> dict:
    """results.json's "provenance" (PROVENANCE_RECORD): this start's layout (``ranks``: every
    rank's facts), versions, code, times, and every segment of the run so far."""
    first_start = next((segment["started"] for segment in segments if segment.get("started")), None)
    return {
        "world_size": len(ranks),
        "local_ranks": ranks[0]["local_ranks"],
        "nodes": len(_hosts(ranks)),
        "hosts": _hosts(ranks),
        "device_type": ranks[0]["device_type"],
        "devices": dict(Counter(rank["device"] for rank in ranks)),
        "threads_per_rank": _threads(ranks),
        "threads_rule": threads_rule,
        "versions": library_versions(),
        **code_state(),
        "started": first_start,
        "ended": ended,
        "segments": [dict(segment) for segment in segments],
    }
