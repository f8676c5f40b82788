"""Selection across trials on hand-made histories: each rule picks the step and the trial it
says, ties go to the earlier step and the lower trial, unfinished runs take no part."""

import json
from pathlib import Path

import pytest

from rsc_dist.results import cli as results_cli
from rsc_dist.results.sweep_select import build_report, choose, markdown
from rsc_dist.results.trials import load_sweep_runs


def evaluation(step, val, target):
    """val: {domain: accuracy} of the sources (counts differ, so pooled != mean)."""
    counts = {"a": 10, "b": 30}
    return {"step": step, "val_per_domain": val, "val_n": counts,
            "val_acc": sum(val[d] * counts[d] for d in val) / sum(counts.values()),
            "val_acc_mean": sum(val.values()) / len(val), "target_acc": {"t": target}, "target_n": {"t": 50}}


# trial -> seed -> history. Mean source val favours trial 0 at step 2 (0.7 = (0.9 + 0.5) / 2);
# pooled favours trial 1 at step 4 ((0.2 * 10 + 0.9 * 30) / 40 = 0.725); the oracle trial 2's
# last step; last compares the last steps' mean val: trial 1 (0.55) over trial 0 (0.5).
HISTORIES = {
    0: [evaluation(2, {"a": 0.9, "b": 0.5}, 0.40), evaluation(4, {"a": 0.5, "b": 0.5}, 0.45)],
    1: [evaluation(2, {"a": 0.3, "b": 0.3}, 0.30), evaluation(4, {"a": 0.2, "b": 0.9}, 0.35)],
    2: [evaluation(2, {"a": 0.1, "b": 0.1}, 0.20), evaluation(4, {"a": 0.1, "b": 0.2}, 0.90)],
}


def make_sweep(root: Path, seeds=(0, 1), unfinished=()) -> Path:
    runs = []
    for trial, history in HISTORIES.items():
        for seed in seeds:
            name = f"rsc-t-t{trial:02d}-s{seed}"
            folder = Path("rsc") / "t" / f"t{trial:02d}-s{seed}"
            runs.append({"name": name, "folder": str(folder), "method": "rsc", "target": "t", "seed": seed,
                         "trial": trial, "hparams": {"optim.lr": 0.1 * (trial + 1)}})
            if name in unfinished:
                continue
            (root / folder).mkdir(parents=True)
            # Seed 1 is seed 0 shifted by 0.1 in target accuracy (same choices, a spread to average).
            shifted = [{**e, "target_acc": {"t": e["target_acc"]["t"] + 0.1 * seed}} for e in history]
            (root / folder / "results.json").write_text(json.dumps({"history": shifted, "targets": ["t"],
                                                                   "sources": ["a", "b"], "dataset": "hand"}))
    (root / "sweep.json").write_text(json.dumps({"name": "hand", "runs": runs}))
    return root


@pytest.mark.parametrize("rule, trial, step, accuracy", [
    ("source_val_mean", 0, 2, 0.40),
    ("source_val_pooled", 1, 4, 0.35),
    ("last", 1, 4, 0.35),
    ("oracle", 2, 4, 0.90),
])
def test_each_rule_picks_its_step_and_trial(tmp_path, rule, trial, step, accuracy):
    loaded = load_sweep_runs(make_sweep(tmp_path))
    assert not loaded.missing
    chosen, candidates = choose(loaded.runs, rule)
    assert set(chosen) == {("rsc_dist", "hand", "rsc", "t", 0), ("rsc_dist", "hand", "rsc", "t", 1)}
    for seed in (0, 1):
        pick = chosen[("rsc_dist", "hand", "rsc", "t", seed)]
        assert (pick.run.trial, pick.step) == (trial, step)
        assert pick.accuracy == pytest.approx(accuracy + 0.1 * seed)
        assert candidates[("rsc_dist", "hand", "rsc", "t", seed)] == 3


def test_the_table_is_mean_and_spread_over_seeds_and_rows_per_setting(tmp_path, capsys):
    root = make_sweep(tmp_path)
    assert results_cli.main([str(root), "--selection", "source_val_mean", "--error", "std"]) == 0
    text = capsys.readouterr().out
    # Trial 0 at step 2: 40 % and 50 %: mean 45, sample std 7.07; 2 trial seeds, 3 trials each.
    assert "| RSC | 45.00 ± 7.07 (2x3) | 45.00 |" in text
    assert "| RSC [rsc_dist] hand t seed 0 | t00 | 2 | 70.00 | 40.00 | optim.lr=0.1 |" in text
    # Every setting at the step the rule picks in each of its runs (trial 2: step 4, 90/100 %).
    assert "| RSC t02 | 95.00 ± 7.07 (2) | optim.lr=0.3 |" in text
    assert "ORACLE" not in text and (root / "selection-source_val_mean.csv").exists()
    # DomainBed's standard error by default: population std 5 over sqrt(2).
    assert results_cli.main([str(root), "--selection", "source_val_mean"]) == 0
    assert "| RSC | 45.00 ± 3.54 (2x3) | 45.00 |" in capsys.readouterr().out
    assert results_cli.main([str(root), "--selection", "oracle"]) == 0
    assert "**ORACLE**" in capsys.readouterr().out


def test_ties_go_to_the_lower_trial_and_unfinished_runs_are_named(tmp_path):
    root = make_sweep(tmp_path, seeds=(0,), unfinished=("rsc-t-t00-s0",))
    copied = json.loads((root / "rsc/t/t01-s0/results.json").read_text())
    (root / "rsc/t/t02-s0/results.json").write_text(json.dumps(copied))  # trial 2 = trial 1
    loaded = load_sweep_runs(root)
    assert loaded.missing == ["rsc-t-t00-s0"]
    assert choose(loaded.runs, "source_val_mean")[0][("rsc_dist", "hand", "rsc", "t", 0)].run.trial == 1
    assert "1 of 3 runs of hand are not finished" in markdown(build_report([loaded], "source_val_mean"))
