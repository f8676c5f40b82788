"""The W&B sweep config generated from a sweep file, expanded the way `wandb agent` expands it
(W&B's own agent code, no server): trial K runs exactly run K of the sweep, with the arguments
every other launcher uses; wandb_agent.sbatch runs one agent trial with the checkout's Python."""

import json
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from rsc_dist import train
from rsc_dist.sweep.cli import main as sweep_main
from rsc_dist.sweep.spec import load_sweep
from support.trainer_fixtures import python_path

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "launch" / "sweeps" / "demo.yaml"
AGENT_SBATCH = REPO / "launch" / "slurm" / "wandb_agent.sbatch"


def generated(tmp_path: Path) -> dict:
    out = tmp_path / "out"
    assert sweep_main([str(SWEEP), "--launcher", "wandb", "--out", str(out), "--set", "data.workers=0"]) == 0
    return yaml.safe_load((out / "wandb_sweep.yaml").read_text())


def agent_command(spec: dict, index: int, run_id: str, monkeypatch, tmp_path) -> tuple[list[str], dict]:
    """The command line and environment W&B's agent builds for one trial (Agent._command_run with
    the process start captured)."""
    from wandb import wandb_agent

    started = {}

    class Capture:
        def __init__(self, command=None, env=None, **kwargs):
            started.update(command=command, env=env)

    monkeypatch.setattr(wandb_agent, "AgentProcess", Capture)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_RUN_ID", "")  # _command_run sets these; monkeypatch restores them
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "")
    agent = types.SimpleNamespace(_sweep_command=spec["command"], _function=None, _in_jupyter=False,
                                  _forward_signals=False, _run_processes={}, _last_report_time=None)
    wandb_agent.Agent._command_run(agent, {"run_id": run_id, "program": spec["program"],
                                           "args": {"index": {"value": index}}})
    return started["command"], started["env"]


def test_the_config_is_a_grid_over_the_sweeps_runs(tmp_path):
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    spec = generated(tmp_path)
    sweep = load_sweep(SWEEP)
    # The run's selection score (source validation), never the target accuracy (an unlabelled oracle).
    assert spec["method"] == "grid" and spec["metric"] == {"name": "best/selection_score", "goal": "maximize"}
    assert spec["parameters"] == {"index": {"values": list(range(len(sweep.runs)))}}
    assert spec["command"][:5] == ["${env}", "${interpreter}", "-m", "rsc_dist.sweep", str(SWEEP)]
    assert spec["command"][-3:] == ["--launcher", "one", "${args}"] and "--set=data.workers=0" in spec["command"]
    assert sweep_utils.create_sweep_command(spec["command"]) == spec["command"]  # no ${envvar:..} left
    # --dry-run prints it and writes nothing.
    assert sweep_main([str(SWEEP), "--launcher", "wandb", "--out", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert not (tmp_path / "dry").exists()


def test_every_trial_runs_its_run_of_the_sweep(monkeypatch, tmp_path, capsys):
    spec = generated(tmp_path)
    sweep = load_sweep(SWEEP, {"data.workers": 0})
    out = tmp_path / "out"
    capsys.readouterr()
    for run in sweep.runs:
        command, env = agent_command(spec, run.index, f"trial{run.index}", monkeypatch, tmp_path)
        assert command[:4] == ["/usr/bin/env", "python", "-m", "rsc_dist.sweep"]
        assert env["WANDB_RUN_ID"] == f"trial{run.index}"  # the trial's W&B run: observe.identity.wandb_run_id uses it
        assert sweep_main(command[4:] + ["--dry-run"]) == 0
        trainer = shlex.split(capsys.readouterr().out.strip())
        assert trainer[1:3] == ["-m", "rsc_dist.train"] and trainer[3:] == run.trainer_args(sweep.preset, out)
        assert train.main(trainer[3:] + ["--print_config"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert (printed["algorithm"], printed["data"]["target"], printed["run"]["seed"]) == (
            run.method, [run.target], run.seed)
        assert printed["optim"]["lr"] == run.hparams["optim.lr"] and printed["data"]["workers"] == 0
        assert printed["run"]["output_dir"] == str(out / run.relative)


def test_one_trial_runs_as_the_agent_runs_it(monkeypatch, tmp_path):
    """The literal command (env + python from PATH + -m rsc_dist.sweep), as a subprocess."""
    spec = generated(tmp_path)
    command, env = agent_command(spec, 5, "trialx", monkeypatch, tmp_path)
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
           "PYTHONPATH": python_path(REPO)}
    result = subprocess.run(command + ["--dry-run"], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--run.name=demo_search-erm-photo-t00-s1" in result.stdout


@pytest.fixture
def fake_wandb(tmp_path):
    """A `wandb` on PATH that records its arguments and working directory, then exits 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "called.txt"
    script = bin_dir / "wandb"
    script.write_text(f'#!/usr/bin/env bash\n{{ pwd; printf "%s\\n" "$@"; echo "RUN_ID=${{WANDB_RUN_ID:-}}"; }} > {record}\n')
    script.chmod(0o755)
    return bin_dir, record


def test_agent_sbatch_runs_one_trial_in_the_workdir(tmp_path, fake_wandb):
    bin_dir, record = fake_wandb
    workdir = tmp_path / "work"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_ARRAY_JOB_ID": "42", "SLURM_ARRAY_TASK_ID": "3", "RSC_ROOT": str(REPO),
           "RSC_VENV": str(tmp_path / "novenv"), "RSC_WORKDIR": str(workdir), "WANDB_RUN_ID": "stale"}
    result = subprocess.run(["bash", str(AGENT_SBATCH), "me/rsc_dist/abc123"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = record.read_text().splitlines()
    assert lines == [str(workdir), "agent", "--count", "1", "--forward-signals", "me/rsc_dist/abc123", "RUN_ID="]
    assert "one trial of sweep me/rsc_dist/abc123" in result.stdout


@pytest.mark.parametrize("args, message", [([], "usage"), (["bad id!"], "is not a sweep id")])
def test_agent_sbatch_rejects_bad_arguments(tmp_path, fake_wandb, args, message):
    env = {**os.environ, "PATH": f"{fake_wandb[0]}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "1",
           "RSC_ROOT": str(REPO)}
    result = subprocess.run(["bash", str(AGENT_SBATCH), *args], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2 and message in result.stderr
