"""The local launcher's mechanics with the stand-in trainer (tests/support/fake_trainer.py, the trainer's
launch contract in a fraction of a second): a queue of K at a time, a failed run does not stop
the others, Ctrl-C stops every run with a checkpoint, a killed launcher leaves no run behind,
rerunning resumes. The real trainer runs through it in test_sweep_e2e.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rsc_dist.sweep.launch_local import make_slots
from rsc_dist.sweep.spec import SweepError
from support.trainer_fixtures import python_path

REPO = Path(__file__).resolve().parent.parent
FAKE = REPO / "tests" / "support" / "fake_trainer.py"


def setup(tmp_path: Path, fail: str = "") -> tuple[Path, Path, dict]:
    """A 4-run sweep (erm/rsc x seeds 0/1) and a trainer wrapper adding the fake's knobs from the
    environment (FAKE_STEPS, FAKE_STEP_TIME); the run named by ``fail`` crashes at step 3."""
    sweep = tmp_path / "sw.yaml"
    sweep.write_text(yaml.safe_dump({"name": "sw", "preset": "demo", "methods": ["erm", "rsc"],
                                     "targets": ["sketch"], "seeds": [0, 1]}))
    wrapper = tmp_path / "trainer.py"
    wrapper.write_text(
        "import json, os, sys\n"
        f"with open({str(tmp_path / 'env.jsonl')!r}, 'a') as f:\n"
        "    seen = {k: os.environ.get(k) for k in ('CUDA_VISIBLE_DEVICES', 'OMP_NUM_THREADS')}\n"
        "    seen['threads_arg'] = [a for a in sys.argv if a.startswith('--train.cpu_threads')]\n"
        "    f.write(json.dumps(seen) + '\\n')\n"
        "args = sys.argv[1:] + ['--fake.steps=' + os.environ.get('FAKE_STEPS', '6'),\n"
        "                       '--fake.step_time=' + os.environ.get('FAKE_STEP_TIME', '0.05'), '--fake.ckpt_every=2']\n"
        f"if {fail!r} and '--run.name=sw-{fail}' in args:\n"
        "    args.append('--fake.fail_at_step=3')\n"
        f"os.execv(sys.executable, [sys.executable, {str(FAKE)!r}, *args])\n")
    env = {**os.environ, "RSC_TRAIN_SCRIPT": str(wrapper), "PYTHONPATH": python_path(REPO)}
    return sweep, tmp_path / "out", env


def launch(sweep: Path, out: Path, env: dict, devices: str = "cpu") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rsc_dist.sweep", str(sweep), "--launcher", "local", "--out",
                             str(out), "--devices", devices, "--parallel", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def events(out: Path) -> list[dict]:
    path = out / "sweep_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fake_events(out: Path, run: str) -> list[dict]:
    method, _, _, seed = run.split("-")
    path = out / method / "sketch" / f"t00-{seed}" / "fake_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_failed_run_does_not_stop_the_others_and_rerunning_retries_only_it(tmp_path):
    sweep, out, env = setup(tmp_path, fail="erm-sketch-t00-s1")
    p = launch(sweep, out, env)
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 1, log
    assert "run erm-sketch-t00-s1 failed (exit 1)" in log and "done 3 | running 0 | failed 1 | queued 0" in log
    assert "fake_trainer: rank 0 failing at step 3" in (out / "logs" / "erm-sketch-t00-s1.log").read_text()
    starts = [e["run"] for e in events(out) if e["event"] == "start"]
    assert sorted(starts) == sorted(f"{m}-sketch-t00-s{s}" for m in ("erm", "rsc") for s in (0, 1))
    # Never more than 2 at once: replay the start/end events.
    running, most = 0, 0
    for e in events(out):
        running += 1 if e["event"] == "start" else -1
        most = max(most, running)
    assert most == 2
    # CPU runs: no GPU, the cores divided between the 2 runs at a time.
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    seen = [json.loads(line) for line in (tmp_path / "env.jsonl").read_text().splitlines()]
    assert seen == [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads,
                     "threads_arg": [f"--train.cpu_threads={threads}"]}] * 4

    # Fixed (the crash no longer happens): a rerun starts only that run, which resumes.
    fixed = tmp_path / "trainer_ok.py"
    fixed.write_text((tmp_path / "trainer.py").read_text().replace("'--fake.fail_at_step=3'", "'--fake.steps=6'"))
    p = launch(sweep, out, {**env, "RSC_TRAIN_SCRIPT": str(fixed)})
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 0, log
    assert "3 finished earlier" in log and "done 4 (3 earlier)" in log
    starts = [e["run"] for e in events(out) if e["event"] == "start"]
    assert starts.count("erm-sketch-t00-s1") == 2 and len(starts) == 5
    # The retried run resumed from its checkpoint of step 2 (it crashed at step 3).
    assert [e["step"] for e in fake_events(out, "erm-sketch-t00-s1") if e["event"] == "start"] == [0, 2]


def test_ctrl_c_stops_every_run_with_a_checkpoint_and_a_rerun_resumes(tmp_path):
    """On "GPUs" 3 and 5 (the stand-in trainer never touches them): one each, never shared."""
    sweep, out, env = setup(tmp_path)
    env["FAKE_STEPS"], env["FAKE_STEP_TIME"] = "2000", "0.02"
    p = launch(sweep, out, env, devices="3,5")
    wait_for(lambda: len([e for e in events(out) if e["event"] == "start"]) == 2
             and all(any(f["event"] == "checkpoint" for f in fake_events(out, e["run"]))
                     for e in events(out) if e["event"] == "start"), 60, "two runs with a checkpoint")
    running = {e["run"]: e["pid"] for e in events(out) if e["event"] == "start"}
    p.send_signal(signal.SIGINT)
    log, _ = p.communicate(timeout=60)
    assert p.returncode == 75, log
    assert "stopping: asked 2 run(s) to checkpoint and stop" in log and "stopped 2" in log
    for run, pid in running.items():
        assert not alive(pid), run
        (stop,) = [e for e in fake_events(out, run) if e["event"] == "stop"]
        assert stop["signal"] == "SIGTERM" and stop["step"] > 0
    assert len([e for e in events(out) if e["event"] == "start"]) == 2, "no run may start after Ctrl-C"

    env["FAKE_STEPS"] = "1"  # the stopped runs are past it: they resume and finish at once
    p = launch(sweep, out, env, devices="3,5")
    log, _ = p.communicate(timeout=120)
    assert p.returncode == 0, log
    for run in running:
        starts = [e["step"] for e in fake_events(out, run) if e["event"] == "start"]
        assert starts[0] == 0 and starts[1] > 0 and len(starts) == 2, (run, starts)
    starts = [e["run"] for e in events(out) if e["event"] == "start"]
    assert len(starts) == 6 and all(starts.count(run) == 2 for run in running)
    # One GPU per run: replay the events; a device is never held by two runs at once.
    holder = {}
    for e in events(out):
        if e["event"] == "start":
            assert e["device"] in ("GPU 3", "GPU 5") and e["device"] not in holder.values(), e
            holder[e["run"]] = e["device"]
        else:
            del holder[e["run"]]
    seen = [json.loads(line)["CUDA_VISIBLE_DEVICES"] for line in (tmp_path / "env.jsonl").read_text().splitlines()]
    assert sorted(set(seen)) == ["3", "5"] and len(seen) == 6


def test_a_killed_launcher_leaves_no_run_behind(tmp_path):
    sweep, out, env = setup(tmp_path)
    env["FAKE_STEPS"], env["FAKE_STEP_TIME"] = "2000", "0.02"
    p = launch(sweep, out, env)
    wait_for(lambda: len([e for e in events(out) if e["event"] == "start"]) == 2, 60, "two runs started")
    pids = {e["run"]: e["pid"] for e in events(out) if e["event"] == "start"}
    wait_for(lambda: all(fake_events(out, run) for run in pids), 30, "the runs' first events")
    p.kill()
    p.wait(timeout=10)
    # The kernel sends each run SIGTERM when the launcher dies: they checkpoint and exit.
    wait_for(lambda: not any(alive(pid) for pid in pids.values()), 30, "the runs to exit")
    for run in pids:
        assert [e["signal"] for e in fake_events(out, run) if e["event"] == "stop"] == ["SIGTERM"]
    p.stdout.close()


def test_runs_of_two_cpu_ranks_side_by_side(tmp_path):
    """--gpus-per-run K: each run is `accelerate launch --num_processes K` on a port of its own;
    on CPUs, K gloo ranks with the cores divided between all ranks."""
    sweep, out, env = setup(tmp_path)
    sweep.write_text(yaml.safe_dump({"name": "sw", "preset": "demo", "methods": ["erm"], "targets": ["sketch"],
                                     "seeds": [0, 1]}))
    env["FAKE_STEPS"] = "4"
    p = subprocess.run([sys.executable, "-m", "rsc_dist.sweep", str(sweep), "--launcher", "local", "--out", str(out),
                        "--devices", "cpu", "--parallel", "2", "--gpus-per-run", "2"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    for run in ("erm-sketch-t00-s0", "erm-sketch-t00-s1"):
        (start,) = [e for e in fake_events(out, run) if e["event"] == "start"]
        assert start["world_size"] == 2, start
        assert json.loads((out / "erm" / "sketch" / f"t00-{run[-2:]}" / "results.json").read_text())["fake"][
            "world_size"] == 2
    assert "2 at a time on 2 CPU ranks" in p.stderr


def test_slots_split_cpus_or_give_one_gpu_each(monkeypatch):
    monkeypatch.setattr("rsc_dist.sweep.launch_local.cpu_cores", lambda: 8)
    slots = make_slots("cpu", 3)
    assert [s.env() for s in slots] == [{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2",
                                         "MKL_NUM_THREADS": "2"}] * 3
    assert [s.trainer_args() for s in slots] == [["--train.cpu_threads=2"]] * 3
    assert [s.env() for s in make_slots("0,2,5", None)] == [{"CUDA_VISIBLE_DEVICES": g} for g in ("0", "2", "5")]
    assert [s.trainer_args() for s in make_slots("0,2,5", None)] == [[]] * 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    assert [s.gpu for s in make_slots("auto", 1)] == ["3"]
    with pytest.raises(SweepError, match="--parallel 3 needs 3 GPUs"):
        make_slots("auto", 3)
    # K GPUs per run: the machine's GPUs in groups of K, queued; CPU threads divided over every rank.
    assert [s.env() for s in make_slots("0,1,2,3,4", None, 2)] == [{"CUDA_VISIBLE_DEVICES": "0,1"},
                                                                   {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert [s.threads for s in make_slots("cpu", 2, 2)] == [2, 2]
    with pytest.raises(SweepError, match="--parallel 2 needs 4 GPUs"):
        make_slots("0,1,2", 2, 2)
    for bad in (0, -1):
        with pytest.raises(SweepError, match=f"--parallel must be at least 1; got {bad}"):
            make_slots("cpu", bad)
