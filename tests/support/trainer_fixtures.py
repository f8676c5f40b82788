"""Tiny shards and a tiny training config for the trainer's tests, made once per session."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rsc_dist.core.contracts import CONFIG_FILE, PREEMPTED_MARKER

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """The demo styles at 32 px, 8 images per class and domain, small uneven shards."""
    from data_prep.convert import convert
    from data_prep.synth import write_demo_dataset

    root = tmp_path_factory.mktemp("tiny")
    src = write_demo_dataset(root / "src", image_size=32, images_per_class=8, seed=0)
    convert("pacs", src, root / "shards", shard_samples=13, workers=1, progress=False)
    return root / "shards"


def tiny_config(tmp_path: Path, shards: Path, **sections) -> Path:
    """A YAML preset on top of demo: 64 px, batch 8, 2 epochs, no image grids, and 1 CPU thread
    per rank whatever the number of ranks and cores (runs that are compared bit for bit must use
    equal thread counts; one thread also keeps parallel tests off each other's cores).

    Loading happens in the training process (data.workers 0): a loader worker's fork server
    imports torch and torchvision once per rank, 7-9 s of a tiny run on 2 cores, and the order of
    the global batches does not depend on the number of workers (tests/test_data_stream.py).
    Tests about processes (signals, kills, a W&B run's threads, data errors raised in a worker,
    evaluation split over workers) ask for a worker themselves: WITH_WORKER."""
    values = {
        "base": "demo",
        "data": {"root": str(shards), "image_size": 64, "batch_size": 8, "workers": 0,
                 "shuffle_block_shards": 2, "eval_batch_size": 32},
        "train": {"epochs": 2, "log_every_steps": 2, "image_log_every_steps": 0,
                  "agree_every_steps": 2, "cpu_threads": 1},
        "schedule": {"warmup_steps": 2},
        "wandb": {"mode": "disabled"},
    }
    for section, update in sections.items():
        if isinstance(update, dict):
            values.setdefault(section, {}).update(update)
        else:
            values[section] = update
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


# data.* of a test about processes: loader workers started from the fork server, as users run.
WITH_WORKER = {"workers": 1}


def refusing_deepspeed(env: dict | None = None) -> dict:
    """``env`` (default: this process's) with tests/support/no_deepspeed first on PYTHONPATH: every
    process of a run started with it fails on importing DeepSpeed, printing where from (a run
    that did not ask for DeepSpeed must never import it)."""
    env = dict(os.environ if env is None else env)
    guard = str(REPO / "tests" / "support" / "no_deepspeed")
    # Extra variables given alone keep this process's PYTHONPATH behind the guard (the tests'
    # folder: every process registers the toy methods from it).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [guard, env.get("PYTHONPATH", os.environ.get("PYTHONPATH"))]))
    return env


def python_path(root: Path = REPO) -> str:
    """PYTHONPATH for a subprocess: the checkout first, then what the test run has (the tests'
    folder, whose support.toy_methods every process registers: tests/conftest.py)."""
    return os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))


def launch_command(args: list[str], *, processes: int = 1, config_file: Path | None = None) -> list[str]:
    """``accelerate launch rsc_dist/train.py ARGS`` as users type it: with a launch config file,
    or with the flags of a CPU run (fp32, no dynamo)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    if config_file is not None:
        command += ["--config_file", str(config_file)]
    else:
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if processes > 1 or config_file is not None:  # a config may pin a port (DeepSpeed's: 29500),
        command += ["--main_process_port", str(_free_port())]  # which even one rank opens
    return command + [str(REPO / "rsc_dist" / "train.py"), *args]


def launch(args: list[str], *, processes: int = 1, timeout: int = 300, env: dict | None = None,
           cwd: Path | None = None, config_file: Path | None = None) -> subprocess.CompletedProcess:
    """Run the trainer as users do (accelerate launch, with ``config_file`` when given), in a
    subprocess with a timeout. The launcher gets its own process group, and a timeout kills the
    whole group: killing the launcher alone leaves its ranks running (a hung rank would keep its
    CPU, ports and shared memory for the rest of the suite)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **(env or {})}
    command = launch_command(args, processes=processes, config_file=config_file)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                          cwd=cwd or REPO, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def sigterm_the_job(command: list[str], run_dir: Path, settle_s: float = 8.0):
    """Start the launcher ``command`` in its own process group, wait until the run is in its
    training loop (RUN/config.yaml is written at the end of setup, then ``settle_s``), and send
    SIGTERM to the whole group, as SLURM or Kubernetes stop a job (accelerate's single-process
    launcher forwards nothing, torchrun forwards SIGTERM but not SIGUSR1). Returns the finished
    launcher (a CompletedProcess) and RUN/preempted.json, which must say SIGTERM."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / CONFIG_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(settle_s)  # into the training loop
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = subprocess.CompletedProcess(command, proc.returncode, out, err)
    marker = run_dir / PREEMPTED_MARKER
    assert marker.exists(), explain(stopped)
    saved = json.loads(marker.read_text())
    assert saved["reason"] == "SIGTERM", saved
    return stopped, saved


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
