"""A whole sweep with the real trainer on this machine: 2 methods x 2 targets x 2 trials x 2 seeds
= 16 runs of 6 steps at 32 px, 2 at a time on the CPU. One run is killed with SIGKILL mid-way;
rerunning the command finishes it from its checkpoint and starts nothing else: every run
completes, none twice. Then the selection across trials equals one computed here by hand from
the runs' results.json files."""

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rsc_dist.results import cli as results_cli
from support.trainer_fixtures import python_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
VICTIM = "erm-sketch-t00-s0"  # among the first two runs started


def sweep_file(tmp_path: Path, shards: Path) -> Path:
    path = tmp_path / "tiny_sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "preset": "demo", "methods": ["erm", "rsc"], "targets": ["sketch", "photo"],
        "seeds": [0, 1],
        "space": {"optim.lr": [0.001, 0.003]},
        "overrides": {
            "data.root": str(shards), "data.image_size": 32, "data.batch_size": 4, "data.workers": 0,
            "data.eval_batch_size": 64, "data.shuffle_block_shards": 2, "optim.name": "adam",
            "schedule.name": "constant", "schedule.warmup_steps": 0, "train.max_steps": 6,
            "train.eval_every_steps": 2, "train.checkpoint_every_steps": 2, "train.agree_every_steps": 1,
            "train.log_every_steps": 2, "train.image_log_every_steps": 0, "train.tracker": "none",
            "wandb.mode": "disabled"},
    }, sort_keys=False))
    return path


def launch(path: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rsc_dist.sweep", str(path), "--launcher", "local", "--parallel",
                             "2", "--devices", "cpu", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": python_path(REPO), "WANDB_SILENT": "true"})


def events(out: Path) -> list[dict]:
    path = out / "sweep_events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def se(values: list[float]) -> float:
    """DomainBed's standard error: np.std(x / sqrt(n)), the population std over sqrt(n)."""
    return statistics.pstdev(values) / len(values) ** 0.5


def by_hand(out: Path, rule: str) -> tuple[dict, dict]:
    """({(method, target): [accuracy % of the chosen trial, per seed]}, {(method, trial, target):
    [accuracy % at the run's pick, per seed]}), from the results.json files alone: within a run
    the first evaluation with the highest score, across trials the highest score (the lower
    trial on ties)."""
    picks = {}  # (method, target, seed) -> (score, trial, target accuracy)
    settings = {}
    for path in sorted(out.glob("*/*/t*-s*/results.json")):
        method, target, name = path.parts[-4:-1]
        trial, seed = (int(x) for x in re.fullmatch(r"t(\d+)-s(\d+)", name).groups())
        history = json.loads(path.read_text())["history"]
        if rule == "source_val_mean":
            scored = [(sum(e["val_per_domain"].values()) / len(e["val_per_domain"]), e) for e in history]
        else:  # oracle
            scored = [(e["target_acc"][target], e) for e in history]
        best_score, best = scored[0]
        for value, evaluation in scored[1:]:
            if value > best_score:
                best_score, best = value, evaluation
        settings.setdefault((method, trial, target), []).append(100 * best["target_acc"][target])
        key = (method, target, seed)
        if key not in picks or best_score > picks[key][0] or (best_score == picks[key][0] and trial < picks[key][1]):
            picks[key] = (best_score, trial, 100 * best["target_acc"][target])
    table = {}
    for (method, target, seed), (_, _, accuracy) in sorted(picks.items()):
        table.setdefault((method, target), []).append(accuracy)
    return table, settings


def test_a_sweep_runs_here_survives_a_kill_and_selects_across_trials(tiny_shards, tmp_path, capsys):  # noqa: F811
    started = time.monotonic()
    path = sweep_file(tmp_path, tiny_shards)
    out = tmp_path / "out"
    first = launch(path, out)
    victim_dir = out / "erm" / "sketch" / "t00-s0"
    deadline = time.monotonic() + 240
    while not (victim_dir / "checkpoints" / "checkpoint_00000002").is_dir():
        assert time.monotonic() < deadline and first.poll() is None, "the victim never reached its checkpoint"
        time.sleep(0.02)
    (pid,) = [e["pid"] for e in events(out) if e["event"] == "start" and e["run"] == VICTIM]
    os.kill(pid, signal.SIGKILL)
    assert not (victim_dir / "results.json").exists(), "the victim finished before it was killed"
    log, _ = first.communicate(timeout=600)
    first_pass = time.monotonic() - started
    assert first.returncode == 1, log
    assert f"run {VICTIM} failed (exit -9)" in log and "done 15 | running 0 | failed 1 | queued 0" in log

    second = launch(path, out)
    log, _ = second.communicate(timeout=300)
    assert second.returncode == 0, log
    assert "15 finished earlier" in log and "all 16 runs finished" in log
    total = time.monotonic() - started

    # Every run completed, none twice: one start each, two for the victim, which resumed.
    starts = [e["run"] for e in events(out) if e["event"] == "start"]
    assert len(set(starts)) == 16 and len(starts) == 17 and starts.count(VICTIM) == 2
    for result in out.glob("*/*/t*-s*/results.json"):
        assert json.loads(result.read_text())["steps"] == 6, result
    assert len(list(out.glob("*/*/t*-s*/results.json"))) == 16
    victim_log = (out / "logs" / f"{VICTIM}.log").read_text()
    resumed = re.findall(r"resumed from \S+checkpoint_(\d+) at step (\d+)", victim_log)
    assert len(resumed) == 1 and int(resumed[0][1]) >= 2, victim_log[-3000:]
    for run in set(starts) - {VICTIM}:
        assert "resumed from" not in (out / "logs" / f"{run}.log").read_text(), run

    # The table equals the one computed by hand, for a real rule and for the oracle.
    for rule in ("source_val_mean", "oracle"):
        capsys.readouterr()
        assert results_cli.main([str(out), "--selection", rule]) == 0
        text = capsys.readouterr().out
        selected, rest = text.split("### Chosen trial")
        expected, settings = by_hand(out, rule)
        for method in ("erm", "rsc"):
            row = next(line for line in selected.splitlines() if line.startswith(f"| {method.upper()} |"))
            cells = [c.strip() for c in row.strip("|").split("|")][1:]
            for target, cell in zip(["photo", "sketch"], cells):
                # DomainBed's standard error over the 2 trial seeds, each the best of 2 trials.
                values = expected[(method, target)]
                assert cell == f"{statistics.fmean(values):.2f} ± {se(values):.2f} (2x2)", (rule, method, target)
            average = statistics.fmean(statistics.fmean(expected[(method, t)]) for t in ("photo", "sketch"))
            assert cells[2] == f"{average:.2f}", (rule, method)  # DomainBed's Avg: the mean of the columns
            for trial in (0, 1):
                row = next(line for line in rest.splitlines() if line.startswith(f"| {method.upper()} t{trial:02d} |"))
                cells = [c.strip() for c in row.strip("|").split("|")][1:3]
                for target, cell in zip(["photo", "sketch"], cells):
                    values = settings[(method, trial, target)]
                    assert cell == f"{statistics.fmean(values):.2f} ± {se(values):.2f} (2)"
        assert ("ORACLE" in text) == (rule == "oracle")
        assert (out / f"selection-{rule}.md").read_text() + "\n" == text
    print(f"sweep of 16 runs: first pass {first_pass:.0f} s, with the rerun {total:.0f} s")
