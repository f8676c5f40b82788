"""launch/wandb/sweep.yaml expanded the way `wandb agent` expands it (W&B's own agent code, no
server), and every expanded command line accepted by the trainer; wandb_agent.sbatch runs one
agent trial with the checkout's Python."""

import itertools
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SWEEP = REPO / "launch" / "wandb" / "sweep.yaml"
AGENT_SBATCH = REPO / "launch" / "slurm" / "wandb_agent.sbatch"


def grid(spec: dict) -> list[dict]:
    """The points of a grid sweep: fixed `value`s, and the product of the `values` lists."""
    fixed = {k: v["value"] for k, v in spec["parameters"].items() if "value" in v}
    swept = {k: v["values"] for k, v in spec["parameters"].items() if "values" in v}
    return [{**fixed, **dict(zip(swept, combo))} for combo in itertools.product(*swept.values())]


def agent_command(spec: dict, point: dict, run_id: str, monkeypatch, tmp_path) -> tuple[list[str], dict]:
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
    command = {"run_id": run_id, "program": spec["program"],
               "args": {key: {"value": value} for key, value in point.items()}}
    wandb_agent.Agent._command_run(agent, command)
    return started["command"], started["env"]


def test_the_sweep_is_a_grid_over_algorithm_target_and_seed():
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    spec = yaml.safe_load(SWEEP.read_text())
    assert spec["method"] == "grid" and spec["metric"] == {"name": "best/target_acc", "goal": "maximize"}
    assert {k for k, v in spec["parameters"].items() if "values" in v} == {"algorithm", "data.target", "run.seed"}
    assert len(grid(spec)) == 2 * 4 * 3
    assert sweep_utils.create_sweep_command(spec["command"]) == spec["command"]  # no ${envvar:..} left


def test_every_expanded_command_line_is_accepted_by_the_trainer(monkeypatch, tmp_path, capsys):
    from rsc_dist import train

    spec = yaml.safe_load(SWEEP.read_text())
    folders = set()
    for i, point in enumerate(grid(spec)):
        command, env = agent_command(spec, point, f"trial{i}", monkeypatch, tmp_path)
        assert command[:4] == ["/usr/bin/env", "python", "-m", "rsc_dist.train"]
        assert env["WANDB_RUN_ID"] == f"trial{i}"  # the trial's W&B run: observe.wandb_run_id uses it
        args = command[4:]
        assert f"--algorithm={point['algorithm']}" in args and f"--run.seed={point['run.seed']}" in args
        assert train.main(args + ["--print_config"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["algorithm"] == point["algorithm"]
        assert printed["data"]["target"] == [point["data.target"]]
        assert printed["run"]["seed"] == point["run.seed"]
        assert printed["run"]["experiment"] == point["run.experiment"]
        assert printed["data"]["root"] == point["data.root"] and printed["preset"] == point["config"]
        if hasattr(train, "resolve_config"):
            config, _ = train.resolve_config(args)
            folder = config.resolved_output_dir(1)
            # runs/EXPERIMENT/ALGO/TARGET/seedS (the trainer may add a settings suffix: seedS-HASH)
            assert folder.parts[:4] == ("runs", point["run.experiment"], point["algorithm"], point["data.target"])
            assert folder.name.split("-")[0] == f"seed{point['run.seed']}"
            folders.add(folder)
    if folders:
        assert len(folders) == len(grid(spec)), "every trial needs its own run folder"


def test_one_expanded_command_runs_as_the_agent_runs_it(monkeypatch, tmp_path):
    """The literal command (env + python from PATH + -m rsc_dist.train), as a subprocess."""
    spec = yaml.safe_load(SWEEP.read_text())
    command, env = agent_command(spec, grid(spec)[-1], "trialx", monkeypatch, tmp_path)
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run(command + ["--print_config"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    assert (printed["algorithm"], printed["data"]["target"], printed["run"]["seed"]) == ("erm", ["sketch"], 2)


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
