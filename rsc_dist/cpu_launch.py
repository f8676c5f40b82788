"""Multi-process training on machines without CUDA.

On a CPU-only machine ``accelerate launch --num_processes 2 train.py`` does not start two
ranks: Accelerate's simple launcher starts ONE process (it expects ``mpirun`` for multi-CPU),
setting MASTER_ADDR/MASTER_PORT but no WORLD_SIZE, and ``--multi_gpu`` would start ranks that
each believe they are alone unless the trainer asks for CPU. This module detects the first
case from the launcher's own arguments and starts the requested number of gloo ranks itself,
forwarding SIGTERM, SIGINT and SIGUSR1 (preemption) to every rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _launcher_argv() -> list[str]:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _flag(argv: list[str], *names: str) -> str | None:
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def requested_processes(argv: list[str] | None = None) -> int:
    """The process count an ``accelerate launch`` parent asked for (flag, then config file)."""
    argv = _launcher_argv() if argv is None else argv
    if not any("accelerate" in part for part in argv[:3]):
        return 1
    value = _flag(argv, "--num_processes", "--num-processes")
    if value is None:
        config_file = _flag(argv, "--config_file", "--config-file")
        default = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "accelerate" / "default_config.yaml"
        path = Path(config_file) if config_file else default
        if path.is_file():
            value = (yaml.safe_load(path.read_text()) or {}).get("num_processes")
    try:
        return max(1, int(value)) if value is not None else 1
    except ValueError:
        return 1


def needs_cpu_ranks(env=os.environ) -> int:
    """How many ranks to start here: > 1 only in the single-process CPU fallback case."""
    import torch

    if torch.cuda.is_available() or "WORLD_SIZE" in env or "MASTER_ADDR" not in env:
        return 1
    if env.get("RSC_DIST_CPU_RANK"):  # we are one of the ranks started below
        return 1
    if not Path(f"/proc/{os.getppid()}/cmdline").exists():
        print("rsc_dist: started by a launcher that sets MASTER_ADDR but not WORLD_SIZE and its "
              "arguments cannot be read here (no /proc): running ONE process. For several CPU ranks "
              "use `accelerate launch --multi_gpu --num_processes N` or "
              "--config_file launch/accelerate/cpu_2proc.yaml", file=sys.stderr)
        return 1
    return requested_processes()


def run_cpu_ranks(num_ranks: int, script: str, args: list[str]) -> int:
    """Start ``num_ranks`` gloo ranks of ``script``; forward signals; first failure ends all."""
    base = dict(os.environ)
    base.update(WORLD_SIZE=str(num_ranks), LOCAL_WORLD_SIZE=str(num_ranks), RSC_DIST_CPU_RANK="1",
                ACCELERATE_USE_CPU="true")
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_ranks)))
    print(f"rsc_dist: no CUDA; starting {num_ranks} CPU ranks over gloo "
          f"({base['MASTER_ADDR']}:{base['MASTER_PORT']})", file=sys.stderr, flush=True)
    children = []
    for rank in range(num_ranks):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        children.append(subprocess.Popen([sys.executable, script, *args], env=env))

    def forward(signum, frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        return _wait_all(children)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_all(children: list[subprocess.Popen], grace_seconds: float = 30.0) -> int:
    while True:
        codes = [child.poll() for child in children]
        failed = [c for c in codes if c not in (None, 0)]
        if failed or all(c is not None for c in codes):
            break
        time.sleep(0.2)
    if failed:
        # A rank that died leaves the others blocked in a collective: stop them.
        deadline = time.monotonic() + grace_seconds
        for child in children:
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        return failed[0]
    return 0
