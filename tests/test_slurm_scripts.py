"""launch/ without a cluster: shellcheck, accelerate configs, sweep.sh (dry run, submission), node_launch.sh's
signal handling. The tests against a real SLURM are in test_slurm.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
FAKE_TRAINER = ROOT / "tests" / "support" / "fake_trainer.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
SCRIPTS = sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch"))


def test_every_script_passes_shellcheck():
    if not shutil.which("shellcheck") and os.geteuid() == 0 and shutil.which("apt-get"):
        from support.slurm_cluster import apt_install

        try:
            apt_install(["shellcheck"])
        except Exception as exc:  # noqa: BLE001 - any apt trouble means "not available here"
            pytest.skip(f"shellcheck is not installed and apt could not install it: {exc}")
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    assert len(SCRIPTS) >= 4, SCRIPTS
    p = subprocess.run(["shellcheck", "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


# --- accelerate configs ----------------------------------------------------------------------

CONFIGS = sorted((LAUNCH / "accelerate").glob("*.yaml"))


def test_the_promised_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"cpu_2proc.yaml", "multinode_ddp.yaml", "deepspeed_zero1.yaml", "deepspeed_zero2.yaml",
            "deepspeed_zero3.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_accepts_config(path):
    """accelerate 1.15's own loader rejects unknown top-level keys; nested deepspeed keys must
    be `accelerate launch` options (that is how the launcher consumes them)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))
    dests = {a.dest for a in launch_command_parser()._actions}
    unknown = set(config.deepspeed_config) - dests
    assert not unknown, f"{path.name}: deepspeed_config keys accelerate launch does not know: {unknown}"
    raw = yaml.safe_load(path.read_text())
    if raw["distributed_type"] == "DEEPSPEED":
        # DeepSpeed's bf16/fp16 modes break BatchNorm CNNs (gpu-anchors.md): fp32 only.
        assert raw["mixed_precision"] == "no"
        assert raw["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
        assert f"zero_stage: {raw['deepspeed_config']['zero_stage']}" in path.read_text()
        assert path.name == f"deepspeed_zero{raw['deepspeed_config']['zero_stage']}.yaml"


def test_cpu_config_starts_two_gloo_ranks(tmp_path):
    """The local CPU command: two ranks that talk to each other (a MULTI_CPU config would start
    one process, see the comment in cpu_2proc.yaml)."""
    out = tmp_path / "run"
    cmd = [*ACCELERATE, "--config_file", str(LAUNCH / "accelerate" / "cpu_2proc.yaml"), str(FAKE_TRAINER),
           "--config", "demo", "--output_dir", str(out), "--resume", "auto", "--fake.steps=3",
           "--fake.step_time=0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["fake"]["world_size"] == 2


# --- node_launch.sh: signals to the ranks, exit 75 ------------------------------------------


def test_node_launch_forwards_usr1_to_the_ranks_and_reports_75(tmp_path):
    """Only the wrapper is signalled (the path where Slurm signals just the task): the ranks
    must still checkpoint at a step boundary, and the wrapper must turn the launcher's 1 into 75."""
    out = tmp_path / "run"
    # node_launch.sh runs `${RSC_ACCELERATE:-accelerate} launch ...`: this venv's accelerate.
    env = dict(os.environ, SLURM_NODEID="0", OMP_NUM_THREADS="1",
               RSC_ACCELERATE=str(Path(sys.executable).parent / "accelerate"))
    cmd = ["bash", str(LAUNCH / "slurm" / "node_launch.sh"), "--config_file",
           str(LAUNCH / "accelerate" / "cpu_2proc.yaml"), "--num_processes", "2", "--num_machines", "1",
           str(FAKE_TRAINER), "--config", "demo", "--output_dir", str(out), "--resume", "auto",
           "--fake.steps=400", "--fake.step_time=0.05", "--fake.ckpt_every=0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        events = out / "fake_events.jsonl"
        deadline = time.monotonic() + 120
        while not events.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the fake trainer did not start in 120 s"
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGUSR1)
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, log[-3000:]
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    stop = [e for e in lines if e["event"] == "stop"]
    assert len(stop) == 1 and stop[0]["signal"] == "SIGUSR1" and stop[0]["ranks_signalled"] == 2
    assert 0 < stop[0]["step"] < 400
    assert (out / "checkpoints" / f"checkpoint_{stop[0]['step']:08d}" / "state.json").exists()
    assert "forwarding to the trainer ranks" in log


# --- sweep.sh: a sweep file submitted as an array job (rsc_dist.sweep --launcher slurm) ------


def sweep(*args, env=None, check=True):
    p = subprocess.run(["bash", str(LAUNCH / "slurm" / "sweep.sh"), *args], capture_output=True, text=True,
                       env=dict(os.environ, RSC_VENV=sys.prefix, **(env or {})), cwd=ROOT, timeout=120)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_sweep_dry_run_lists_every_run_and_writes_nothing(tmp_path):
    out = tmp_path / "tab2"
    # --dry-run last, after every other option: still a dry run.
    p = sweep("launch/sweeps/pacs_resnet18.yaml", "--out", str(out), "--max-parallel", "3",
              "--sbatch=--time=2:00:00", "--set", "data.root=/shared/pacs", "--dry-run")
    lines = p.stdout.splitlines()
    submit = next(line for line in lines if " sbatch " in line)
    tasks = [line for line in lines if line.startswith("# task ")]
    assert len(tasks) == 2 * 4 * 3  # methods x PACS domains x seeds
    assert f"RSC_TASK_FILE={out}/tasks-" in submit
    for part in ("--job-name=pacs_r18", "--array=0-23%3", f"--output={out}/logs/%x-%A_%a.out",
                 "--gpus-per-node=1", "--time=2:00:00", "launch/slurm/train.sbatch --config pacs_resnet18"):
        assert part in submit, part
    runs = set()
    for line in tasks:
        args = line.split(": ", 1)[1].split()
        assert args[:3] == ["train.py", "--config", "pacs_resnet18"]
        opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        assert opts["data.root"] == "/shared/pacs" and opts["run.experiment"] == "pacs_r18"
        folder = f"{opts['algorithm']}/{opts['data.target']}/t00-s{opts['run.seed']}"
        assert args[args.index("--output_dir") + 1] == f"{out}/{folder}"
        runs.add((opts["algorithm"], opts["data.target"], opts["run.seed"]))
    assert runs == {(a, t, s) for a in ("rsc", "erm") for t in ("art_painting", "cartoon", "photo", "sketch")
                    for s in ("0", "1", "2")}
    assert not out.exists(), "--dry-run must not write anything"


def test_sweep_submits_the_unfinished_runs_once(tmp_path):
    """With an sbatch stand-in: the task file holds one line per unfinished run, the command is the
    array job of train.sbatch, and finished runs are not submitted again."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch.txt"
    (bin_dir / "sbatch").write_text(f'#!/usr/bin/env bash\n{{ printf "%s\\n" "$@"; echo "TASKS=$RSC_TASK_FILE"; }} > {record}\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "sw"
    sweep_file = tmp_path / "sw.yaml"
    sweep_file.write_text(yaml.safe_dump({"preset": "demo", "methods": ["rsc", "erm"], "targets": ["photo"],
                                          "seeds": [0]}))
    done = out / "erm" / "photo" / "t00-s0"
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps({"config": {"algorithm": "erm"}}))
    p = sweep(str(sweep_file), "--out", str(out), env=env)
    assert "submitted array job 4242 (1 tasks)" in p.stdout and "(1 to run, 1 already finished)" in p.stdout
    argv = record.read_text().splitlines()
    task_file = Path(argv[-1].split("=", 1)[1])
    assert argv[:-1] == ["--parsable", "--job-name=sw", "--array=0-0", f"--output={out}/logs/%x-%A_%a.out",
                         str(LAUNCH / "slurm" / "train.sbatch"), "--config", "demo"]
    (line,) = task_file.read_text().splitlines()
    assert line.split("\t")[:3] == ["--algorithm=rsc", "--data.target=photo", "--run.seed=0"]
    assert line.split("\t")[-4:] == ["--output_dir", str(out / "rsc" / "photo" / "t00-s0"), "--resume", "auto"]
    assert (out / "array_jobs.txt").read_text().startswith("4242\t")
    assert json.loads((out / "sweep.json").read_text())["name"] == "sw"


@pytest.mark.parametrize("args, message", [
    (["pacs_resnet18", "--seeds", "0,1"], "pacs_resnet18: no such sweep file"),
    (["launch/sweeps/demo.yaml", "--launcher", "local"], "sweep.sh always submits to SLURM"),
    (["launch/sweeps/demo.yaml", "--", "--data.root=X", "--dry-run"], "not after --"),
    (["launch/sweeps/demo.yaml", "--set", "data.rot=X", "--dry-run"], "unknown config field 'data.rot'"),
])
def test_sweep_rejects_bad_arguments(args, message):
    p = sweep(*args, check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr

