"""launch/slurm against a real SLURM: a one-node cluster on this machine (tests/support/slurm_cluster.py;
installs slurm-wlm and munge with apt when missing), the real sbatch scripts, 2 CPU processes.

Requeued jobs: Slurm holds a requeued batch job for about two minutes (BeginTime = now + 120 s)
before it may start again; the tests lift that hold with `scontrol update StartTime=now` so they
take seconds. On a cluster the hold simply delays the resume.

The trainer is tests/support/fake_trainer.py (same launch contract as rsc_dist/train.py, seconds per
run). To run the preemption test with the real trainer, it is the second entry of TRAINERS.
"""

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.slurm_cluster import FINAL_STATES, ClusterUnavailable, SlurmCluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
SWEEP = ROOT / "launch" / "slurm" / "sweep.sh"


@dataclass(frozen=True)
class Trainer:
    script: Path
    args: tuple  # a short run of it
    final_keys: tuple  # what must be equal after a resume: results.json[k1][k2]...

    def final(self, run_dir: Path):
        value = json.loads((run_dir / "results.json").read_text())
        for key in self.final_keys:
            value = value[key]
        return value


FAKE = Trainer(ROOT / "tests" / "support" / "fake_trainer.py",
               ("--config", "demo", "--fake.steps=40", "--fake.step_time=0.25", "--fake.ckpt_every=5"),
               ("fake", "weight"))
# The real trainer on its demo preset, CPU-sized (key names from rsc_dist/config.py).
REAL = Trainer(ROOT / "rsc_dist" / "train.py",
               ("--config", "demo", "--train.max_steps=16", "--train.checkpoint_every_steps=4",
                "--train.eval_every_steps=16", "--data.workers=0", "--wandb.mode=disabled"), ("last",))
TRAINERS = [
    pytest.param(FAKE, id="fake"),
    pytest.param(REAL, id="real", marks=pytest.mark.skipif(not REAL.script.exists(),
                                                            reason="rsc_dist/train.py not written yet")),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    except ClusterUnavailable as exc:
        pytest.skip(f"no SLURM here: {exc}")
    try:
        yield c
    finally:
        c.stop()


def job_env(tmp_path: Path, trainer: Trainer = FAKE) -> dict:
    return {"RSC_DEVICE": "cpu", "RSC_TRAIN_SCRIPT": str(trainer.script), "RSC_VENV": sys.prefix,
            "RSC_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def submit(cluster, tmp_path, name, args, env) -> str:
    return cluster.sbatch([f"--job-name={name}", f"--output={tmp_path}/%x-%j.out", str(SBATCH), *args],
                          env=env, cwd=ROOT)


def wait_for(predicate, timeout: float, what: str, cluster=None, jobs=(), logs=()):
    """Poll `predicate`; fail at once (with the job logs) if one of `jobs` has ended meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        ended = [j for j in jobs if cluster.job(j).get("JobState") in FINAL_STATES]
        if ended or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    text = "".join(f"--- {p.name} ---\n{p.read_text()[-4000:]}\n" for p in logs if p.exists())
    raise TimeoutError(f"{what}: not within {timeout:.0f} s (ended jobs: {ended})\n{text}")


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob("checkpoint_*[0-9]"))


def requeue_now(cluster, jobid: str) -> dict:
    """Wait until the job is back in the queue after its requeue, then lift Slurm's hold."""
    info = cluster.wait(jobid, lambda i: i.get("Restarts") == "1" and i.get("JobState") in ("PENDING", "RUNNING"),
                        90, "requeued (Restarts=1)")
    if info["JobState"] == "PENDING":
        # Lift the hold only once the previous start's step daemons are gone: started earlier,
        # slurmd kills the new start ("Job credential revoked") or its ranks find the
        # rendezvous port still taken (both seen on CI). On a cluster the ~120 s hold does this.
        wait_steps_gone(info["JobId"])
        cluster.run(["scontrol", "update", f"JobId={jobid}", "StartTime=now"])
    return info


def wait_steps_gone(raw_jobid: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    marker = f"[{raw_jobid}."
    while time.monotonic() < deadline:
        titles = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        if not any(line.startswith("slurmstepd") and marker in line for line in titles.splitlines()):
            time.sleep(1)  # let slurmd finish its own bookkeeping of the ended steps
            return
        time.sleep(0.25)
    raise TimeoutError(f"steps of job {raw_jobid} still running after {timeout:.0f} s")


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "fake_events.jsonl").read_text().splitlines()]


def starts_log(run_dir: Path) -> list[dict]:
    return [dict(kv.split("=", 1) for kv in line.split()[2:] if "=" in kv)
            for line in (run_dir / "slurm_starts.log").read_text().splitlines()]


@pytest.mark.parametrize("trainer", TRAINERS)
def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(cluster, tmp_path, trainer):
    env = job_env(tmp_path, trainer)
    ref = submit(cluster, tmp_path, "ref", trainer.args, env)
    pre = submit(cluster, tmp_path, "pre", trainer.args, env)
    ref_dir, pre_dir = tmp_path / "runs" / "ref", tmp_path / "runs" / "pre"

    wait_for(lambda: has_checkpoint(pre_dir), 300, f"a checkpoint in {pre_dir}", cluster, [pre],
             [tmp_path / f"pre-{pre}.out"])
    assert cluster.job(pre)["JobState"] == "RUNNING"
    # What --signal=B:USR1@120 does before the time limit: USR1 to the batch script only.
    cluster.run(["scancel", "--signal=USR1", "--batch", pre])
    requeue_now(cluster, pre)
    ref_info, pre_info = cluster.wait_done(ref, 300), cluster.wait_done(pre, 300)

    log = (tmp_path / f"pre-{pre}.out").read_text()
    assert (pre_info["JobState"], pre_info["ExitCode"], pre_info["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert (ref_info["JobState"], ref_info["Restarts"]) == ("COMPLETED", "0")
    assert "SIGUSR1: asking the trainer to checkpoint and stop" in log
    assert f"requeueing {pre} to resume" in log and f"finished: {pre_dir}" in log
    # Both starts wrote to the same folder (so: the same W&B run id, derived from it), the second
    # one as a restart, and the trainer cleared its "resume me" marker on the second start.
    assert [s["restart"] for s in starts_log(pre_dir)] == ["0", "1"]
    assert not (pre_dir / "preempted.json").exists()

    assert trainer.final(pre_dir) == trainer.final(ref_dir)
    if trainer is FAKE:
        ev = events(pre_dir)
        (stop,) = [e for e in ev if e["event"] == "stop"]
        begins = [e for e in ev if e["event"] == "start"]
        assert stop["signal"] == "SIGUSR1" and stop["ranks_signalled"] == 2  # every rank got it
        assert [b["step"] for b in begins] == [0, stop["step"]] and 0 < stop["step"] < 40
        assert [b["world_size"] for b in begins] == [2, 2]
        assert f"--run.name=pre-{pre}" in begins[0]["argv"] and begins[0]["argv"] == begins[1]["argv"]
        assert [e["event"] for e in events(ref_dir)].count("start") == 1


def test_exit_paths_crash_cancel_and_trainer_initiated_stop(cluster, tmp_path):
    """A crash is not requeued; a cancel (SIGTERM) checkpoints but is not requeued; a stop the
    trainer decides itself (exit 75 -> launcher 1, plus preempted.json) is requeued."""
    env = job_env(tmp_path)
    runs = tmp_path / "runs"
    crash = submit(cluster, tmp_path, "crash", [*FAKE.args, "--fake.fail_at_step=3"], env)
    cancel = submit(cluster, tmp_path, "cancel", FAKE.args, env)
    wait_for(lambda: has_checkpoint(runs / "cancel"), 180, "a checkpoint of the job to cancel",
             cluster, [cancel], [tmp_path / f"cancel-{cancel}.out"])
    cluster.run(["scancel", cancel])  # SIGTERM to everything: checkpoint, then stop for good
    selfstop = submit(cluster, tmp_path, "selfstop", [*FAKE.args, "--fake.stop_at_step=8"], env)
    crash_info, cancel_info = cluster.wait_done(crash, 300), cluster.wait_done(cancel, 300)

    crash_log = (tmp_path / f"crash-{crash}.out").read_text()
    assert (crash_info["JobState"], crash_info["Restarts"]) == ("FAILED", "0"), crash_log
    assert "trainer failed (exit 1): not requeued" in crash_log
    assert (cancel_info["JobState"], cancel_info["Restarts"]) == ("CANCELLED", "0")
    (stop,) = [e for e in events(runs / "cancel") if e["event"] == "stop"]
    assert stop["signal"] == "SIGTERM"
    assert (runs / "cancel" / "checkpoints" / f"checkpoint_{stop['step']:08d}").is_dir()

    requeue_now(cluster, selfstop)
    info = cluster.wait_done(selfstop, 300)
    log = (tmp_path / f"selfstop-{selfstop}.out").read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), log
    assert [e["step"] for e in events(runs / "selfstop") if e["event"] == "start"] == [0, 8]
    assert cluster.job(cancel)["JobState"] == "CANCELLED"  # nothing requeued it late


def test_sweep_array_requeues_only_the_signalled_task_then_tables(cluster, tmp_path):
    # The sweep file is validated against the real config; the stand-in trainer gets its knobs
    # from a wrapper (RSC_TRAIN_SCRIPT), as train.sbatch runs whatever that names.
    wrapper = tmp_path / "trainer.py"
    wrapper.write_text("import os, sys\n"
                       f"os.execv(sys.executable, [sys.executable, {str(FAKE.script)!r}, *sys.argv[1:], "
                       "'--fake.steps=40', '--fake.step_time=0.25', '--fake.ckpt_every=5'])\n")
    sweep_file = tmp_path / "sw.yaml"
    sweep_file.write_text(json.dumps({"name": "sw", "preset": "demo", "methods": ["rsc", "erm"],
                                      "targets": ["photo"], "seeds": [0]}))
    env = {**cluster.env, **job_env(tmp_path), "RSC_TRAIN_SCRIPT": str(wrapper)}
    sweep_dir = tmp_path / "runs" / "sw"
    p = subprocess.run(["bash", str(SWEEP), str(sweep_file), "--out", str(sweep_dir)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    array = p.stdout.split("submitted array job ")[1].split()[0]
    dirs = {0: sweep_dir / "rsc" / "photo" / "t00-s0", 1: sweep_dir / "erm" / "photo" / "t00-s0"}

    # The victim: the task whose own job id IS the array's id. `scontrol requeue $SLURM_JOB_ID`
    # there would requeue every task of the array; the script must name ARRAY_TASK.
    def victim():
        tasks = cluster.array_tasks(array)
        return next((i for i, t in tasks.items() if t["JobId"] == array and t["JobState"] == "RUNNING"), None)

    wait_for(lambda: victim() is not None, 120, "the array task with the array's job id running", cluster)
    v = victim()
    wait_for(lambda: has_checkpoint(dirs[v]), 180, f"a checkpoint of task {v}", cluster, [f"{array}_{v}"],
             [sweep_dir / "logs" / f"sw-{array}_{v}.out"])
    cluster.run(["scancel", "--signal=USR1", "--batch", f"{array}_{v}"])
    requeue_now(cluster, f"{array}_{v}")
    wait_for(lambda: all(t["JobState"] == "COMPLETED" for t in cluster.array_tasks(array).values())
             and len(cluster.array_tasks(array)) == 2, 300, "both tasks completed", cluster)

    tasks = cluster.array_tasks(array)
    assert tasks[v]["Restarts"] == "1" and tasks[1 - v]["Restarts"] == "0"
    assert len(starts_log(dirs[v])) == 2 and len(starts_log(dirs[1 - v])) == 1
    for i, algorithm in ((0, "rsc"), (1, "erm")):
        start = events(dirs[i])[0]
        assert {"--algorithm=" + algorithm, "--data.target=photo", "--run.seed=0", "--run.experiment=sw",
                f"--run.name=sw-{algorithm}-photo-t00-s0", "--output_dir", str(dirs[i])} <= set(start["argv"])
        assert (sweep_dir / "logs" / f"sw-{array}_{i}.out").exists()

    # And the sweep's table.
    r = subprocess.run([sys.executable, "-m", "rsc_dist.results", str(sweep_dir)], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    for algorithm, d in (("RSC", dirs[0]), ("ERM", dirs[1])):
        acc = json.loads((d / "results.json").read_text())["best"]["target_acc"]["photo"]
        assert f"| {algorithm} | {100 * acc:.2f} (1) | {100 * acc:.2f} (1) |" in r.stdout
    # Running the sweep again submits nothing: every run has its results.json.
    again = subprocess.run(["bash", str(SWEEP), str(sweep_file), "--out", str(sweep_dir)],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert "(0 to run, 2 already finished)" in again.stdout and "nothing to submit" in again.stdout
