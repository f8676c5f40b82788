"""Run a sweep on this machine: a queue, at most P runs at once, each on K GPUs (--gpus-per-run,
default 1) or on K CPU ranks with the cores split between the runs.

Each run is `python -m rsc_dist.train ... --resume auto` (K > 1: `accelerate launch
--num_processes K rsc_dist/train.py ...` on a port of its own) in its own process group (its own
session), with its own log file OUT/logs/NAME.log. Finished runs are skipped; started ones
resume from their newest checkpoint. A failed run is reported and the others go on.

Stopping: SIGINT (Ctrl-C) or SIGTERM to the sweep sends SIGTERM to every running run's process
group; the trainer checkpoints at its next agreement step and exits 75. Runs still alive after
--stop-timeout seconds (or at a second Ctrl-C) are killed (SIGKILL, the whole group). Each run
is also started with the kernel's parent-death signal set to SIGTERM, so a sweep that is itself
killed (kill -9) still stops its runs cleanly instead of leaving them behind.

Every start and end is a line of OUT/sweep_events.jsonl ({"event": "start"|"end", "run", ...}).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rsc_dist.core.contracts import EXIT_OK, EXIT_PREEMPTED, PREEMPTED_MARKER, RESULTS_FILE
from rsc_dist.core.cpus import cpu_cores, threads_per_process
from rsc_dist.sweep.spec import RunSpec, Sweep, SweepError
from rsc_dist.sweep.state import DONE, check_finished_runs, write_record

EVENTS_FILE = "sweep_events.jsonl"
_PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.2


@dataclass
class Slot:
    """Where one run goes: its GPUs (ids for CUDA_VISIBLE_DEVICES, one rank each), or a share of
    the CPU cores for ``ranks`` CPU ranks."""
    gpus: tuple[str, ...]
    threads: int | None
    ranks: int = 1

    @property
    def gpu(self) -> str | None:  # a one-GPU slot's id
        return ",".join(self.gpus) if self.gpus else None

    def env(self) -> dict:
        if self.gpus:
            return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus)}
        threads = str(self.threads)
        return {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}

    def trainer_args(self) -> list[str]:
        """The trainer's own setting for the same share: it reads no OMP_NUM_THREADS (accelerate
        launch sets that variable itself), so a CPU run is told its thread count explicitly."""
        return [] if self.gpus else [f"--train.cpu_threads={self.threads}"]

    def describe(self) -> str:
        if self.gpus:
            return f"GPU{'s' if len(self.gpus) > 1 else ''} {','.join(self.gpus)}"
        ranks = f"{self.ranks} CPU ranks" if self.ranks > 1 else "CPU"
        return f"{ranks}, {self.threads} thread(s){' each' if self.ranks > 1 else ''}"


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip() and d.strip() != "-1"]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(l for l in listing.splitlines() if l.startswith("GPU "))]


def make_slots(devices: str, parallel: int | None, per_run: int = 1) -> list[Slot]:
    """``devices``: auto (GPUs when there are any, else CPU), cpu, or GPU ids "0,1,3";
    ``per_run``: processes of each run (GPUs, or CPU ranks), K of --gpus-per-run."""
    if parallel is not None and parallel < 1:
        raise SweepError(f"--parallel must be at least 1; got {parallel}")
    if per_run < 1:
        raise SweepError(f"--gpus-per-run must be at least 1; got {per_run}")
    if devices == "auto":
        gpus = visible_gpus()
    elif devices == "cpu":
        gpus = []
    else:
        gpus = [d.strip() for d in devices.split(",") if d.strip()]
        if not gpus:
            raise SweepError(f"--devices {devices!r}: expected auto, cpu or GPU ids such as 0,1")
    if gpus:
        fits = len(gpus) // per_run
        parallel = parallel or fits
        if parallel > fits:
            each = f"{per_run} each" if per_run > 1 else "one per run"
            raise SweepError(f"--parallel {parallel} needs {parallel * per_run} GPUs ({each}); {len(gpus)} available "
                             f"({','.join(gpus)}); pass --parallel {max(fits, 1)}"
                             + (" or fewer --gpus-per-run" if fits == 0 else "") + " or --devices cpu")
        return [Slot(tuple(gpus[i * per_run:(i + 1) * per_run]), None, per_run) for i in range(parallel)]
    parallel = parallel or 1
    threads = threads_per_process(cpu_cores(), parallel * per_run)
    return [Slot((), threads, per_run) for _ in range(parallel)]


def trainer_command(python: str = sys.executable) -> list[str]:
    """How a run is started: the trainer module, or RSC_TRAIN_SCRIPT (as train.sbatch reads it;
    the tests use a stand-in trainer with the same contract)."""
    script = os.environ.get("RSC_TRAIN_SCRIPT")
    return [python, script] if script else [python, "-m", "rsc_dist.train"]


def launch_command(slot: Slot, python: str = sys.executable) -> list[str]:
    """The command of a run on ``slot``: the trainer itself for one process, else `accelerate
    launch` of K processes (one per GPU of the slot, or K CPU ranks over gloo) on a free port,
    so that runs started side by side do not meet at one rendezvous."""
    if slot.ranks == 1:
        return trainer_command(python)
    script = os.environ.get("RSC_TRAIN_SCRIPT") or str(Path(__file__).resolve().parents[1] / "train.py")
    # --multi_gpu on CPUs too: only Accelerate's torchrun path starts K ranks (its CPU path starts
    # one, launch/accelerate/cpu_2proc.yaml says why); a trainer that sees no GPU forms gloo ranks.
    return [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(slot.ranks),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), script]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the sweep's own exit handling remains
        pass


@dataclass
class Running:
    run: RunSpec
    slot: Slot
    process: subprocess.Popen
    log: object
    started: float


class LocalSweep:
    def __init__(self, sweep: Sweep, out: Path, slots: list[Slot], stop_timeout: float,
                 python: str = sys.executable, status_stream=None):
        self.sweep, self.out, self.slots, self.stop_timeout = sweep, out, slots, stop_timeout
        self.python = python
        self.stream = status_stream or sys.stderr
        self.running: dict[str, Running] = {}
        self.done, self.failed, self.stopped, self.skipped = [], [], [], 0
        self.stop_requested = 0  # signals received
        self.last_status = ""

    # --- bookkeeping --------------------------------------------------------------------------

    def event(self, **fields) -> None:
        with open(self.out / EVENTS_FILE, "a") as f:
            f.write(json.dumps({**fields, "time": round(time.time(), 3)}) + "\n")

    def status(self, queued: int, final: bool = False) -> None:
        line = (f"[sweep {self.sweep.name}] done {len(self.done)}"
                + (f" ({self.skipped} earlier)" if self.skipped else "")
                + f" | running {len(self.running)} | failed {len(self.failed)}"
                + (f" | stopped {len(self.stopped)}" if self.stopped else "") + f" | queued {queued}")
        if line == self.last_status and not final:
            return
        self.last_status = line
        if self.stream.isatty():
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def say(self, message: str) -> None:
        if self.stream.isatty() and self.last_status:
            self.stream.write("\r\033[K")
        self.stream.write(message + "\n")
        self.stream.flush()
        self.last_status = ""

    # --- runs ---------------------------------------------------------------------------------

    def start(self, run: RunSpec, slot: Slot) -> None:
        command = [*launch_command(slot, self.python), *run.trainer_args(self.sweep.preset, self.out),
                   *slot.trainer_args()]
        log_path = self.out / "logs" / f"{run.name}.log"
        log = open(log_path, "a")
        log.write(f"\n=== {time.strftime('%F %T')} start on {slot.describe()}: {' '.join(command)}\n")
        log.flush()
        env = {**os.environ, **slot.env(), "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True, preexec_fn=_die_with_parent)
        self.running[run.name] = Running(run, slot, process, log, time.monotonic())
        self.event(event="start", run=run.name, pid=process.pid, device=slot.describe())

    def reap(self) -> list[Slot]:
        """Collect finished runs; returns the slots they free."""
        freed = []
        for name, item in list(self.running.items()):
            rc = item.process.poll()
            if rc is None:
                continue
            del self.running[name]
            item.log.close()
            freed.append(item.slot)
            folder = self.out / item.run.relative
            seconds = round(time.monotonic() - item.started, 1)
            self.event(event="end", run=name, rc=rc, seconds=seconds)
            if rc == EXIT_OK and (folder / RESULTS_FILE).is_file():
                self.done.append(name)
            elif rc == EXIT_PREEMPTED or (folder / PREEMPTED_MARKER).is_file() or self.stop_requested:
                # Checkpointed and stopped, or ended by the stop this sweep asked for (a run still
                # starting up, before the trainer handles signals): resumable, not failed.
                self.stopped.append(name)
            else:
                self.failed.append(name)
                self.say(f"run {name} failed (exit {rc}); log: {self.out / 'logs' / (name + '.log')}")
        return freed

    def signal_running(self, sig: int) -> None:
        for item in self.running.values():
            try:
                os.killpg(item.process.pid, sig)  # the run's own session: its pid is the group id
            except ProcessLookupError:
                pass

    # --- the loop -----------------------------------------------------------------------------

    def execute(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        lock = open(self.out / ".sweep.lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise SweepError(f"{self.out} is being run by another sweep launcher ({lock.read().strip() or 'pid ?'})")
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        lock.flush()

        states = check_finished_runs(self.sweep.runs, self.out)
        write_record(self.sweep, self.out)
        queue = [run for run in self.sweep.runs if states[run.name] != DONE]
        self.skipped = len(self.sweep.runs) - len(queue)
        self.done = [run.name for run in self.sweep.runs if states[run.name] == DONE]
        self.say(f"sweep {self.sweep.name}: {len(self.sweep.runs)} runs under {self.out}, {self.skipped} finished "
                 f"earlier; {len(self.slots)} at a time on {self.slots[0].describe()}"
                 + (" each" if len(self.slots) > 1 and not self.slots[0].gpus else "")
                 + f"; logs in {self.out / 'logs'}")
        free = list(self.slots)
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        stop_deadline = None
        try:
            while queue or self.running:
                free += self.reap()
                if self.stop_requested:
                    queue = []
                    if stop_deadline is None:
                        stop_deadline = time.monotonic() + self.stop_timeout
                        self.say(f"stopping: asked {len(self.running)} run(s) to checkpoint and stop "
                                 f"(SIGTERM; killed after {self.stop_timeout:g} s or at a second Ctrl-C)")
                        self.signal_running(signal.SIGTERM)
                    if self.stop_requested > 1 or time.monotonic() > stop_deadline:
                        self.say(f"killing {len(self.running)} run(s) that did not stop in time")
                        self.signal_running(signal.SIGKILL)
                        stop_deadline = float("inf")
                while queue and free and not self.stop_requested:
                    self.start(queue.pop(0), free.pop(0))
                self.status(len(queue))
                time.sleep(POLL_SECONDS)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if self.running:  # an exception in the loop: never leave runs behind
                self.signal_running(signal.SIGKILL)
                for item in self.running.values():
                    item.process.wait()
            lock.close()
        self.status(0, final=True)
        return self.summary()

    def _on_signal(self, signum, _frame) -> None:
        self.stop_requested += 1

    def summary(self) -> int:
        out = self.out
        if self.failed:
            self.say(f"{len(self.failed)} run(s) failed: {', '.join(self.failed)}; their logs are in {out / 'logs'}; "
                     "rerun the same command to retry them (finished runs are skipped)")
        unfinished = len(self.sweep.runs) - len(self.done) - len(self.failed)
        if unfinished:
            self.say(f"{unfinished} run(s) not finished (stopped or not started); rerun the same command to resume")
        if self.failed:
            return 1
        if unfinished:
            return EXIT_PREEMPTED
        self.say(f"all {len(self.done)} runs finished; the table: python -m rsc_dist.results {out} "
                 "--selection source_val_mean")
        return EXIT_OK


def run_local(sweep: Sweep, out: Path, devices: str, parallel: int | None, stop_timeout: float,
              per_run: int = 1) -> int:
    slots = make_slots(devices, parallel, per_run)
    return LocalSweep(sweep, out, slots, stop_timeout).execute()

