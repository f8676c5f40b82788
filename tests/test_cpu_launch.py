"""Reading the process count an `accelerate launch` parent asked for, with Accelerate's parser."""

import pytest

from rsc_dist.trainer import cpu_launch
from rsc_dist.trainer.cpu_launch import LaunchError, requested_layout


def test_flag_forms_and_config_file(tmp_path):
    launcher = ["/usr/bin/python", "/venv/bin/accelerate", "launch"]
    assert requested_layout(launcher + ["--num_processes", "3", "train.py"]) == (3, 1)
    assert requested_layout(launcher + ["--num_processes=2", "train.py", "--num_processes", "9"]) == (2, 1)
    module = ["/usr/bin/python", "-m", "accelerate.commands.launch"]
    assert requested_layout(module + ["--num_processes", "4", "--mixed_precision", "no", "t.py"]) == (4, 1)
    config = tmp_path / "c.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\n"
                      "num_processes: 4\nnum_machines: 2\n")
    assert requested_layout(launcher + ["--config_file", str(config), "train.py"]) == (4, 2)
    assert requested_layout(["/usr/bin/python", "train.py", "--num_processes", "5"]) is None  # not accelerate


def test_unknowable_or_impossible_requests_are_errors(monkeypatch):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    monkeypatch.setattr(cpu_launch, "_launcher_argv", lambda: None)
    with pytest.raises(LaunchError, match="number of ranks asked for is unknown"):
        cpu_launch.needs_cpu_ranks(env)
    monkeypatch.setattr(cpu_launch, "_launcher_argv", lambda: ["/v/bin/accelerate", "launch", "--num_processes", "2",
                                                                "--num_machines", "2", "t.py"])
    with pytest.raises(LaunchError, match="--num_machines 2 on CPU-only machines"):
        cpu_launch.needs_cpu_ranks(env)
    monkeypatch.setattr(cpu_launch, "_launcher_argv", lambda: ["/usr/bin/python", "t.py"])
    assert cpu_launch.needs_cpu_ranks(env) == 1
    assert cpu_launch.needs_cpu_ranks({}) == 1  # no launcher asked for anything
