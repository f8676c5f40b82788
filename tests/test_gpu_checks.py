"""launch/gpu_checks.sh --dry-run: every distinct command of the GPU check script runs on the
CPU at tiny sizes, so a lent GPU's first minutes never go to a script error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from support.trainer_fixtures import python_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "gpu_checks.sh"


# Steps a dry run lists but does not run: the same command as another step, only the
# architecture differs (launch/gpu_checks.sh, dry_repeat_of).
DRY_RUN_REPEATS = {"bench_input_resnet50_device": "bench_input_resnet18_device",
                   "bench_input_resnet50_workers": "bench_input_resnet18_workers",
                   "bench_resnet18": "bench_resnet50", "bench_timm": "bench_resnet50"}


def _steps() -> list[str]:
    """The step names the script runs (expanding its two input-pipeline loops)."""
    text = SCRIPT.read_text()
    names = re.findall(r"^step (\w+) ", text, flags=re.M)
    looped = re.findall(r'^\s+step "(\w+)_\$\{arch\}_\$\{decode\}"', text, flags=re.M)
    return names + [f"{prefix}_{arch}_{decode}" for prefix in looped
                    for arch in ("resnet18", "resnet50") for decode in ("device", "workers")]


def _dry_run(tmp_path: Path, timeout: int, **extra_env: str) -> subprocess.CompletedProcess:
    """``gpu_checks.sh --dry-run`` with this interpreter, results under tmp_path/out."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "PYTHONPATH": python_path(ROOT), "CUDA_VISIBLE_DEVICES": "", **extra_env}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_checks_dry_run_runs_every_step(tmp_path):
    done = _dry_run(tmp_path, timeout=900)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert done.returncode == 0, summary + done.stderr[-3000:]
    steps = _steps()
    assert len(steps) >= 10 and "train_demo" in steps and "bench_input_resnet50_device" in steps
    # A step that repeats an earlier command with another architecture is listed, not run; every
    # other step ran and passed (so every distinct command line of the script ran once).
    for name in steps:
        if name in DRY_RUN_REPEATS:
            assert DRY_RUN_REPEATS[name] in steps and re.search(
                rf"^## {name} \(dry run: the command of {DRY_RUN_REPEATS[name]} with another architecture, "
                r"not repeated\)$", summary, flags=re.M), f"step {name} missing"
            assert not (tmp_path / "out" / f"{name}.log").exists(), f"{name} ran"
        else:
            assert re.search(rf"^## {name} \(exit 0, \d+s\)$", summary, flags=re.M), f"step {name} missing or failed"
    # The device-path rows say how many ops and how much host time a batch took, and which decoder ran.
    log = (tmp_path / "out" / "bench_input_resnet18_device.log").read_text()
    assert re.search(r"device path: \d+ aten ops per batch, [\d.]+ ms host time per batch; jpeg decoder: "
                     r"torchcodec .* on the CPU", log), log[-2000:]
    assert "fed fraction" in log


def test_gpu_checks_refuses_unknown_arguments():
    done = subprocess.run(["bash", str(SCRIPT), "--dryrun"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage" in done.stderr


def test_gpu_checks_keep_to_their_time_budget(tmp_path):
    """With no time left every step is skipped and named as such, so a lent GPU's call always
    returns its summary before the device tool's per-call limit kills it."""
    done = _dry_run(tmp_path, timeout=120, GPU_CHECKS_BUDGET_S="0")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert done.returncode == 0, summary + done.stderr[-3000:]
    for name in _steps():
        assert re.search(rf"^## {name} \(skipped: 0s of the 0s budget left\)$", summary, flags=re.M), summary
    assert f"{len(_steps())} step(s) skipped" in done.stderr
    assert not list((tmp_path / "out").glob("*.log")), "a skipped step ran"


def test_gpu_checks_refuse_a_budget_that_is_not_seconds(tmp_path):
    done = _dry_run(tmp_path, timeout=60, GPU_CHECKS_BUDGET_S="9m")
    assert done.returncode == 2 and "GPU_CHECKS_BUDGET_S" in done.stderr and "'9m'" in done.stderr
