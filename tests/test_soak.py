"""Soak: a 2-rank run killed with SIGKILL again and again, at random moments inside a training
step, an evaluation and a checkpoint save, and resumed after each kill, ends with the weights and
every evaluation record of an uninterrupted run.

After each kill: the launcher and every process of its session (ranks, fork servers, loader
workers, resource trackers) are gone within seconds; every checkpoint completed before the kill
passes the trainer's integrity check; the resume loads the newest one (no fallback); nothing
imports DeepSpeed (tests/support/no_deepspeed), resume and checkpoint paths included. A kill
either ends the whole job (the process group, as a node failure or an OOM kill of the job does)
or one rank only (the launcher must then end the other). Where the run is when it is killed is
seen from outside: an evaluation shard open in a loader worker (evaluation), a temporary
checkpoint folder (save), a training shard open and neither of those (a step).

RSC_DIST_SOAK_KILLS (default 3, one in each place: CI) sets the number of kills; RSC_DIST_SOAK_SEED the draws. The
full form, RSC_DIST_SOAK_KILLS=20, is recorded in BENCHMARKS.md ("Soak").
"""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rsc_dist.core.contracts import CHECKPOINTS_DIR, RESULTS_FILE
from rsc_dist.trainer import checkpoints
from support.trainer_fixtures import (REPO, WITH_WORKER, explain, launch, launch_command, refusing_deepspeed,
                                      tiny_config)

pytestmark = pytest.mark.slow

KILLS = int(os.environ.get("RSC_DIST_SOAK_KILLS", "3"))
SEED = int(os.environ.get("RSC_DIST_SOAK_SEED", "0"))
PHASES = ("step", "eval", "save")
EVERY = 2  # evaluation and checkpoint cadence, in steps


def _session_processes(session: int) -> dict[int, str]:
    """{pid: command line} of the live processes of a session (zombies excluded)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == session and fields[0] != "Z":
            found[int(entry.name)] = cmdline
    return found


def _open_files(pids) -> set[str]:
    paths = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    paths.add(os.readlink(fd))
                except OSError:
                    pass
        except OSError:
            pass
    return paths


def _phase(session: int, shards: Path, run_dir: Path, target: str) -> str | None:
    """What the run is doing now, as far as can be seen from outside."""
    root = run_dir / CHECKPOINTS_DIR
    if root.is_dir() and any(p.name.startswith(".tmp_") for p in root.iterdir()):
        return "save"
    tars = [Path(p) for p in _open_files(_session_processes(session)) if p.startswith(str(shards)) and p.endswith(".tar")]
    if any(p.name.startswith("val-") or p.parent.name == target for p in tars):
        return "eval"
    return "step" if tars else None


def _rank_pids(session: int) -> list[int]:
    """The ranks rsc_dist.trainer.cpu_launch started (not their fork servers or loader workers,
    which inherit the environment but run other command lines)."""
    ranks = []
    for pid, cmdline in _session_processes(session).items():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"RSC_DIST_CPU_RANK=1" in env and "rsc_dist/train.py" in cmdline:
            ranks.append(pid)
    return ranks


def _newest(run_dir: Path) -> Path | None:
    complete = checkpoints.checkpoint_dirs(run_dir)
    return complete[-1] if complete else None


def _kill_during(command, run_dir: Path, shards: Path, phase: str, whole_job: bool, rng: random.Random,
                 deadline_s: float = 600) -> dict:
    """Start the run, SIGKILL it (the job's process group or one rank) once it has saved a new
    checkpoint (so that every start makes progress) and is in ``phase``; returns what happened.
    The launcher ends within its timeout and leaves no process behind."""
    resumed_from = _newest(run_dir)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=refusing_deepspeed({**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}),
                            start_new_session=True)
    session, seen, killed = proc.pid, None, None
    delay = {"step": rng.uniform(0.2, 2.0), "eval": rng.uniform(0.0, 0.3), "save": rng.uniform(0.0, 0.05)}[phase]
    try:
        end = time.monotonic() + deadline_s
        while proc.poll() is None and time.monotonic() < end:
            seen = _phase(session, shards, run_dir, "sketch") if _newest(run_dir) != resumed_from else None
            if seen == phase:
                time.sleep(delay)
                if whole_job:
                    os.killpg(session, signal.SIGKILL)
                    killed = "job"
                else:
                    ranks = _rank_pids(session)
                    if not ranks:
                        continue
                    victim = rng.choice(sorted(ranks))
                    os.kill(victim, signal.SIGKILL)
                    killed = f"rank pid {victim}"
                break
            time.sleep(0.01)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(session, signal.SIGKILL)
            proc.communicate()
    left = _session_processes(session)
    settle = time.monotonic() + 30
    while left and time.monotonic() < settle:  # a fork server notices its owner's death by a pipe
        time.sleep(0.2)
        left = _session_processes(session)
    assert not left, f"processes left behind after the kill ({killed} in {phase}): {left}\n{out[-3000:]}"
    return {"phase": phase, "killed": killed, "returncode": proc.returncode, "output": out}


def _final_state(run_dir: Path) -> tuple[dict, dict, dict]:
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    last = checkpoints.checkpoint_dirs(run_dir)[-1]
    weights = load_file(str(last / "model.safetensors"))
    best = load_file(str(run_dir / CHECKPOINTS_DIR / "best" / "model.safetensors"))
    return results, weights, best


def test_random_sigkills_of_a_two_rank_run_end_as_an_uninterrupted_run(tmp_path, tiny_shards):
    steps = EVERY * (2 * KILLS + 1)  # each start saves 1 or 2 checkpoints before its kill: room for all
    config = tiny_config(tmp_path, tiny_shards, data={"image_size": 32, **WITH_WORKER},
                         train={"max_steps": steps, "eval_every_steps": EVERY, "checkpoint_every_steps": EVERY,
                                "keep_checkpoints": 3, "agree_every_steps": 1})
    whole = launch(["--config", str(config), "--output_dir", str(tmp_path / "whole")], processes=2, timeout=900,
                   env=refusing_deepspeed())
    assert whole.returncode == 0, explain(whole)

    run_dir = tmp_path / "killed"
    command = launch_command(["--config", str(config), "--output_dir", str(run_dir)], processes=2)
    rng = random.Random(SEED)
    history = []
    for kill in range(KILLS):
        phase = PHASES[kill % len(PHASES)] if kill < len(PHASES) else rng.choice(PHASES)
        # One rank (its fork server and workers must go with it; the launcher ends the other rank,
        # within about 20 s), then the whole job twice, in turn.
        happened = _kill_during(command, run_dir, tiny_shards, phase, whole_job=kill % 3 != 0, rng=rng)
        history.append({k: v for k, v in happened.items() if k != "output"})
        assert happened["killed"], f"the run ended before it was killed in {phase}: {happened['output'][-3000:]}"
        previous = history[-2]["newest"] if len(history) > 1 else None
        if previous is not None:  # this start resumed from the newest checkpoint of the last kill
            assert f"resumed from {previous}" in happened["output"], happened["output"][-3000:]
        assert "could not be loaded" not in happened["output"], happened["output"][-3000:]
        for folder in checkpoints.checkpoint_dirs(run_dir):  # every checkpoint completed before the kill
            assert checkpoints.find_damaged_file(folder) is None, (folder, checkpoints.find_damaged_file(folder))
        history[-1]["newest"] = _newest(run_dir)

    final = launch(["--config", str(config), "--output_dir", str(run_dir)], processes=2, timeout=900,
                   env=refusing_deepspeed())
    assert final.returncode == 0, explain(final) + f"\nkills: {history}"
    if history[-1]["newest"] is not None:
        assert f"resumed from {history[-1]['newest']}" in final.stdout, explain(final)
    assert {h["phase"] for h in history} == set(PHASES[:min(KILLS, len(PHASES))])

    expected, expected_weights, expected_best = _final_state(tmp_path / "whole")
    got, weights, best = _final_state(run_dir)
    for key in ("history", "best", "last", "steps"):
        assert got[key] == expected[key], (key, history)
    assert weights.keys() == expected_weights.keys() and best.keys() == expected_best.keys()
    for name in expected_weights:
        assert torch.equal(weights[name], expected_weights[name]), name
    for name in expected_best:
        assert torch.equal(best[name], expected_best[name]), name
    segments = got["provenance"]["segments"]  # the run's starts tile its steps
    assert segments[0]["start_step"] == 0 and segments[-1]["end_step"] == steps
    assert all(a["end_step"] == b["start_step"] for a, b in zip(segments, segments[1:])), segments
    print(json.dumps({"kills": history, "segments": len(segments)}, default=str))
