"""launch/ without a cluster: shellcheck, accelerate configs, sweep.sh --dry-run, node_launch.sh's
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
FAKE_TRAINER = ROOT / "tests" / "fake_trainer.py"
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
SCRIPTS = sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch"))


def test_every_script_passes_shellcheck():
    if not shutil.which("shellcheck") and os.geteuid() == 0 and shutil.which("apt-get"):
        from slurm_cluster import apt_install

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
    assert len(stop) == 1 and stop[0]["signal"] == "SIGUSR1" and stop[0]["ranks_flagged"] == 2
    assert 0 < stop[0]["step"] < 400
    assert (out / "checkpoints" / f"checkpoint_{stop[0]['step']:08d}" / "state.json").exists()
    assert "forwarding to the trainer ranks" in log


# --- sweep.sh --dry-run --------------------------------------------------------------------


def sweep(*args, env=None, check=True):
    p = subprocess.run(["bash", str(LAUNCH / "slurm" / "sweep.sh"), *args], capture_output=True, text=True,
                       env=dict(os.environ, **(env or {})), cwd=ROOT, timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_sweep_dry_run_lists_every_run(tmp_path):
    p = sweep("pacs_resnet18", "--dry-run", "--runs", str(tmp_path), "--name", "tab2", "--seeds", "0,1",
              "--max-parallel", "3", "--sbatch=--time=2:00:00", "--", "--data.root=/shared/pacs")
    lines = p.stdout.splitlines()
    submit = next(line for line in lines if " sbatch " in line)
    tasks = [line for line in lines if line.startswith("# task ")]
    assert len(tasks) == 2 * 4 * 2  # algorithms x PACS domains x seeds
    assert f"RSC_TASK_FILE={tmp_path}/tab2/tasks-" in submit
    for part in ("--job-name=tab2", "--array=0-15%3", f"--output={tmp_path}/tab2/logs/%x-%A_%a.out",
                 "--time=2:00:00", "launch/slurm/train.sbatch --config pacs_resnet18 --data.root=/shared/pacs"):
        assert part in submit, part
    runs = set()
    for line in tasks:
        args = line.split(": ", 1)[1].split()
        assert args[:4] == ["train.py", "--config", "pacs_resnet18", "--data.root=/shared/pacs"]
        opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        out = args[args.index("--output_dir") + 1]
        assert opts["wandb.group"] == "tab2"
        assert out == f"{tmp_path}/tab2/{opts['algorithm']}/{opts['data.target']}/seed{opts['run.seed']}"
        runs.add((opts["algorithm"], opts["data.target"], opts["run.seed"]))
    assert runs == {(a, t, s) for a in ("rsc", "erm") for t in ("art_painting", "cartoon", "photo", "sketch")
                    for s in ("0", "1")}
    assert not (tmp_path / "tab2").exists(), "--dry-run must not write anything"


def test_sweep_skips_finished_runs_and_knows_each_presets_domains(tmp_path):
    done = tmp_path / "s" / "erm" / "sketch" / "seed0"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    p = sweep("demo", "--dry-run", "--runs", str(tmp_path), "--name", "s", "--seeds", "0",
              "--targets", "photo,sketch", "--algorithms", "rsc,erm")
    assert "(3 to run, 1 already finished)" in p.stdout
    assert "erm/sketch" not in p.stdout
    for preset, domains in (("vlcs_alexnet", "Caltech101 LabelMe SUN09 VOC2007"),
                            ("officehome_resnet18", "Art Clipart Product Real_World"),
                            ("domainbed_pacs_resnet50", "art_painting cartoon photo sketch"),
                            ("demo", "photo cartoon sketch painting")):
        out = sweep(preset, "--dry-run", "--seeds", "0", "--algorithms", "rsc", "--runs", str(tmp_path)).stdout
        found = [a.split("=", 1)[1] for a in out.split() if a.startswith("--data.target=")]
        assert found == domains.split(), preset
    # ImageNet: the preset's own target (ImageNet-Sketch), no --data.target, folder "default".
    out = sweep("imagenet_resnet50", "--dry-run", "--seeds", "0", "--algorithms", "erm", "--runs", str(tmp_path),
                "--name", "in").stdout
    assert "--data.target" not in out and f"{tmp_path}/in/erm/default/seed0" in out


@pytest.mark.parametrize("args, message", [
    (["pacs_resnet18", "--seeds", "0,x"], "--seeds: 'x' is not"),
    (["pacs_resnet18", "--algorithms", "rsc,dro"], "--algorithms: 'dro' is not rsc or erm"),
    (["mystery_preset"], "no default target domains for preset 'mystery_preset'"),
    (["pacs_resnet18", "--frobnicate"], "unknown option --frobnicate"),
    (["pacs_resnet18", "--name", "a b"], "--name: 'a b'"),
])
def test_sweep_rejects_bad_arguments(args, message):
    p = sweep(*args, "--dry-run", check=False)
    assert p.returncode == 2 and message in p.stderr, p.stderr

