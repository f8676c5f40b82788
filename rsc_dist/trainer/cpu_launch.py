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

from rsc_dist.core.contracts import EXIT_CONFIG

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class LaunchError(RuntimeError):
    """The CPU launch request cannot be carried out as asked; the message says what to do."""


def _launcher_argv() -> list[str] | None:
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _launch_arguments(argv: list[str]) -> list[str] | None:
    """The arguments after ``accelerate launch`` (or ``-m accelerate.commands.launch``), or None."""
    for i, part in enumerate(argv[:4]):
        if part == "accelerate.commands.launch":
            return argv[i + 1:]
        if Path(part).name in ("accelerate", "accelerate-launch"):
            rest = argv[i + 1:]
            if Path(part).name == "accelerate":
                return rest[1:] if rest[:1] == ["launch"] else None
            return rest
    return None


def requested_layout(argv: list[str]) -> tuple[int, int] | None:
    """(num_processes, num_machines) an ``accelerate launch`` command line asks for, read with
    Accelerate's own argument parser and config-file loader; None if argv is not one."""
    from accelerate.commands.config import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    arguments = _launch_arguments(argv)
    if arguments is None:
        return None
    args, _ = launch_command_parser().parse_known_args(arguments)
    processes, machines = args.num_processes, args.num_machines
    config_file = args.config_file or (default_config_file if Path(default_config_file).is_file() else None)
    if config_file and (processes is None or machines is None):
        config = load_config_from_file(config_file)
        processes = config.num_processes if processes is None else processes
        machines = config.num_machines if machines is None else machines
    return max(1, int(processes or 1)), max(1, int(machines or 1))


def needs_cpu_ranks(env=os.environ) -> int:
    """How many ranks to start here: > 1 only in the single-process CPU fallback case.

    Raises LaunchError when the launcher asked for several processes and this cannot be done
    (or cannot be known): the trainer never silently runs a different number of ranks.
    """
    import torch

    if torch.cuda.is_available() or "WORLD_SIZE" in env or "MASTER_ADDR" not in env:
        return 1
    if env.get("RSC_DIST_CPU_RANK"):  # we are one of the ranks started below
        return 1
    # Accelerate's simple launcher sets MASTER_ADDR only when it was asked for several
    # processes or machines, and passes the count nowhere but its own command line.
    argv = _launcher_argv()
    if argv is None:
        raise LaunchError(
            "started by a launcher that set MASTER_ADDR but not WORLD_SIZE, and its command line "
            "cannot be read here, so the number of ranks asked for is unknown. For several CPU ranks "
            "use `accelerate launch --config_file launch/accelerate/cpu_2proc.yaml ...` (torchrun)")
    layout = requested_layout(argv)
    if layout is None:  # not started by accelerate launch: nobody asked for more ranks
        return 1
    processes, machines = layout
    if machines > 1:
        raise LaunchError(
            f"--num_machines {machines} on CPU-only machines: accelerate's simple launcher cannot start "
            "ranks on other machines. Use the torchrun route on every machine: accelerate launch "
            "--config_file launch/accelerate/multinode_cpu.yaml --num_machines N --machine_rank R ...")
    return processes


def start_ranks_if_needed(script: str, argv: list[str] | None, prog: str) -> int | None:
    """For a command's main(): the exit code when this process started (or refused to start) the
    CPU ranks itself, None when it is a rank (or alone) and should go on."""
    try:
        ranks = needs_cpu_ranks()
    except LaunchError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if ranks > 1:
        return run_cpu_ranks(ranks, script, sys.argv[1:] if argv is None else argv)
    return None


def exit_if_this_process_starts_the_ranks(script: str, prog: str) -> None:
    """For a command run as a script, called before its own imports: on a CPU-only machine the
    process ``accelerate launch --num_processes N`` starts only starts the N ranks and waits for
    them, so it exits here (with their exit code) without importing the trainer, which would
    delay the ranks' start by about 3 s on a 2-core machine (BENCHMARKS.md, "Start-up of a tiny run")."""
    started = start_ranks_if_needed(script, None, prog)
    if started is not None:
        sys.exit(started)


def run_cpu_ranks(num_ranks: int, script: str, args: list[str]) -> int:
    """Start ``num_ranks`` gloo ranks of ``script``; forward signals; first failure ends all."""
    base = dict(os.environ)
    base.update(WORLD_SIZE=str(num_ranks), LOCAL_WORLD_SIZE=str(num_ranks), RSC_DIST_CPU_RANK="1",
                ACCELERATE_USE_CPU="true")
    # Each rank sets its own intra-op thread count (rsc_dist.trainer.build.cpu_threads) from
    # LOCAL_WORLD_SIZE; OMP_NUM_THREADS (accelerate launch's 1) is left as it is.
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


def _wait_all(children: list[subprocess.Popen], grace_seconds: float = 10.0) -> int:
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
