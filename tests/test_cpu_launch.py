"""Reading the process count an `accelerate launch` parent asked for."""

from rsc_dist.cpu_launch import requested_processes


def test_flag_forms_and_config_file(tmp_path):
    launcher = ["/usr/bin/python", "/venv/bin/accelerate", "launch"]
    assert requested_processes(launcher + ["--num_processes", "3", "train.py"]) == 3
    assert requested_processes(launcher + ["--num_processes=2", "train.py"]) == 2
    config = tmp_path / "c.yaml"
    config.write_text("num_processes: 4\n")
    assert requested_processes(launcher + ["--config_file", str(config), "train.py"]) == 4
    assert requested_processes(["/usr/bin/python", "train.py", "--num_processes", "5"]) == 1  # not accelerate
