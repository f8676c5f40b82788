"""The shell scripts repeat the trainer's contract literals (shell cannot import Python): they
must equal rsc_dist.contracts, and no bare copy of them may hide elsewhere in the script."""

import re
from pathlib import Path

import pytest

from rsc_dist import contracts

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
    from fake_trainer import EX_TEMPFAIL

    assert EX_TEMPFAIL == contracts.EXIT_PREEMPTED
