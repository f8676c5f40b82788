"""The shell scripts repeat the trainer's contract literals (shell cannot import Python): they
must equal rsc_dist.contracts, and no bare copy of them may hide elsewhere in the script."""

import re
from pathlib import Path

import pytest

from rsc_dist.core import contracts

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {
    "launch/slurm/train.sbatch": {"EXIT_PREEMPTED": contracts.EXIT_PREEMPTED,
                                  "PREEMPTED_MARKER": contracts.PREEMPTED_MARKER},
    "launch/slurm/node_launch.sh": {"EXIT_PREEMPTED": contracts.EXIT_PREEMPTED},
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_shell_literals_equal_the_python_constants(script):
    text = (REPO / script).read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for name, value in SCRIPTS[script].items():
        assigned = re.findall(rf"^\s*{name}=(\S+)\s*$", code, flags=re.M)
        assert assigned == [str(value)], f"{script}: expected one line {name}={value}, found {assigned}"
        # Every other use goes through the variable.
        uses = [m.start() for m in re.finditer(rf"(?<![\w.]){re.escape(str(value))}(?![\w])", code)]
        assert len(uses) == 1, f"{script}: {value!r} appears {len(uses)} times outside comments; use ${name}"


def test_fake_trainer_follows_the_contract():
    from support.fake_trainer import EX_TEMPFAIL

    assert EX_TEMPFAIL == contracts.EXIT_PREEMPTED


def test_results_json_is_described_once_and_the_docs_point_there():
    """contracts.py holds the layout; the other places that mention results.json refer to it
    instead of repeating (and drifting from) it."""
    import rsc_dist.results.tables

    for key, (kind, meaning) in {**contracts.RESULTS_LAYOUT, **contracts.EVALUATION_RECORD}.items():
        assert kind and meaning, key
    places = {"launch/README.md": (REPO / "launch/README.md").read_text(),
              "README.md": (REPO / "README.md").read_text(),
              "rsc_dist/results/tables.py docstring": rsc_dist.results.tables.__doc__}
    for name, text in places.items():
        assert "rsc_dist/core/contracts.py" in text, f"{name} should point to rsc_dist/core/contracts.py"
        for repeated in ('"val_acc"', '"target_acc"', "best_checkpoint", '"history"'):
            assert repeated not in text, f"{name} repeats the results.json layout ({repeated})"


def test_layout_problems_finds_missing_extra_and_mistyped_keys():
    record = {"step": 3, "val_acc": 0.5, "val_acc_mean": None, "val_per_domain": {"a": 0.5},
              "val_n": {"a": 4}, "target_acc": {"t": 0.2}, "target_top5": {"t": 0.9}, "target_n": {"t": 5},
              "target_out_acc": {}, "target_out_n": {},
              "val_loss": 0.7, "val_loss_mean": 0.7, "val_loss_per_domain": {"a": 0.7}}
    assert contracts.layout_problems(record, contracts.EVALUATION_RECORD) == []
    bad = {**record, "val_n": {"a": 4.5}, "extra": 1}
    del bad["step"]
    assert contracts.layout_problems(bad, contracts.EVALUATION_RECORD) == [
        "step: missing", "extra: not in the layout", "val_n.a: expected int, got 4.5"]


def test_the_run_folder_names_users_rely_on():
    """The one place the names are written out: scripts, docs and users' habits rely on them, so
    renaming a constant is a change of contract that must fail here first. Every other test
    builds its paths from the constants."""
    from rsc_dist.trainer import checkpoints

    assert (contracts.RESULTS_FILE, contracts.CONFIG_FILE, contracts.PREEMPTED_MARKER, contracts.CHECKPOINTS_DIR) \
        == ("results.json", "config.yaml", "preempted.json", "checkpoints")
    assert checkpoints.BEST_RELATIVE == "checkpoints/best"
    assert (checkpoints.MODEL_FILE, checkpoints.BEST_CONFIG_FILE) == ("model.safetensors", "config.yaml")
    assert checkpoints.CHECKPOINT_PATTERN.match("checkpoint_00000120").group(1) == "00000120"
