"""DomainBed's protocol (issue #27), checked against DomainBed's published definitions:

- the sweep expansion (protocol: domainbed): hparams seed 0 = the registry's defaults, every
  other (hparams seed, trial seed) its own draw, the trial seed drawing the split;
- its three selection rules and its tables (mean ± standard error, Avg, averages table),
  computed here by hand from synthetic records the way DomainBed's model_selection.py and
  collect_results.py define them, against `python -m rsc_dist.results --selection` on the same
  sweep written in this project's layout and in DomainBed's own (results.jsonl + done);
- the options each mode of rsc_dist.results refuses instead of ignoring.
No training: synthetic records only.
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from rsc_dist.results import cli
from rsc_dist.sweep.cli import main as sweep_main
from rsc_dist.sweep.spec import SweepError, load_sweep

# -- the sweep expansion ---------------------------------------------------------------------------

DEMO_DATA = {"data.root": "demo", "data.classes": [], "data.dataset": "demo"}


def sweep_file(tmp_path: Path, **changes) -> Path:
    values = {"name": "dbt", "preset": "domainbed_pacs_resnet50", "protocol": "domainbed", "methods": ["erm", "rsc"],
              "targets": ["sketch", "photo"], "n_trials": 3, "overrides": dict(DEMO_DATA)}
    values.update(changes)
    path = tmp_path / "db.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


DEFAULTS = {"optim.lr": 5e-5, "optim.weight_decay": 0.0, "data.batch_size": 32, "model.dropout": 0.0}


def test_trial_0_is_the_defaults_and_each_trial_seed_draws_its_own(tmp_path, capsys):
    sweep = load_sweep(sweep_file(tmp_path))
    # DomainBed's defaults: 3 trial seeds; methods x targets x hparams seeds x trial seeds.
    assert sweep.protocol == "domainbed" and len(sweep.runs) == 2 * 2 * 3 * 3
    runs = {(r.method, r.target, r.trial, r.seed): r for r in sweep.runs}
    for (method, target, trial, seed), run in runs.items():
        if trial == 0:  # the registry's defaults; RSC's own: the preset's 1/3 (DomainBed's defaults)
            own = {"rsc.p_channel": pytest.approx(1 / 3), "rsc.p_batch": pytest.approx(1 / 3)} if method == "rsc" else {}
            assert run.hparams == {**DEFAULTS, **own}
        h = run.hparams
        assert 1e-5 <= h["optim.lr"] <= 10 ** -3.5 and 8 <= h["data.batch_size"] <= 45
        assert 1e-6 <= h["optim.weight_decay"] <= 1e-2 or trial == 0
        assert h["model.dropout"] in (0.0, 0.1, 0.5)
        config = run.config()
        # The trial seed draws the validation split; the run's own seed is a hash of the run.
        assert (config.data.holdout_fraction, config.data.holdout_seed) == (0.2, seed)
        assert config.run.seed == run.run_seed and config.optim.lr == h["optim.lr"]
        # DomainBed's batch is per source domain: fixed globally, so any number of processes keeps it.
        assert config.data.global_batch_size == 3 * h["data.batch_size"]
        assert config.data.target == (target,) and config.algorithm == method
    assert len({r.run_seed for r in sweep.runs}) == len(sweep.runs)
    for trial in (1, 2):
        draws = [runs[("rsc", "sketch", trial, seed)].hparams for seed in (0, 1, 2)]
        assert len({json.dumps(d, sort_keys=True) for d in draws}) == 3, "each trial seed draws its own"
        for seed in (0, 1, 2):
            rsc, erm = runs[("rsc", "sketch", trial, seed)].hparams, runs[("erm", "photo", trial, seed)].hparams
            # A field's draw depends on (hparams seed, trial seed, name) only: shared by methods and targets.
            assert {k: rsc[k] for k in erm} == erm == runs[("erm", "sketch", trial, seed)].hparams
    # The listing shows it: trial 0 with the defaults for every seed, other trials differing.
    assert sweep_main([str(sweep_file(tmp_path)), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "protocol domainbed" in text and "3 hparams seeds (0 = DomainBed's defaults) x 3 trial seeds" in text
    for seed in (0, 1, 2):
        line = next(row for row in text.splitlines() if f" rsc-sketch-t00-s{seed} " in row)
        assert line.endswith("optim.lr=5e-05 optim.weight_decay=0 data.batch_size=32 model.dropout=0 "
                             "rsc.p_channel=0.3333 rsc.p_batch=0.3333")
    assert len({row.split("new")[1] for row in text.splitlines() if "rsc-sketch-t01-s" in row}) == 3


def test_target_pairs_add_the_runs_leave_one_domain_out_needs(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, methods=["erm"], n_trials=1, seeds=[0], target_pairs=True))
    # Each target alone, then with every other domain of the dataset, each pair once.
    assert [r.target for r in sweep.runs] == ["sketch", "photo", "cartoon+sketch", "painting+sketch",
                                              "photo+sketch", "cartoon+photo", "painting+photo"]
    assert sweep.runs[2].config().data.target == ("cartoon", "sketch")


@pytest.mark.parametrize("changes, message", [
    ({"preset": "demo", "overrides": {}}, "differs from what DomainBed fixes: data.sampling='merged'"),
    ({"overrides": {**DEMO_DATA, "optim.lr": 1e-4}}, "optim.lr is fixed in overrides (or --set) and searched by "
                                                     "DomainBed's registry"),
    ({"default_space": True}, "protocol domainbed always searches DomainBed's registry"),
    ({"space": {"optim.lr": [1e-4, 1e-3]}}, "a grid axis; protocol domainbed draws every trial"),
    ({"overrides": {**DEMO_DATA, "data.holdout_seed": 3}}, "data.holdout_seed is set by seeds"),
    ({"overrides": {**DEMO_DATA, "rsc.mode": "spatial"}}, "rsc.mode='spatial' (DomainBed: 'channel'"),
])
def test_what_domainbed_fixes_is_not_silently_changed(tmp_path, changes, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        load_sweep(sweep_file(tmp_path, **changes))


# -- selection and tables, by hand -----------------------------------------------------------------

ENVS = ["env0", "env1", "env2"]  # a dataset DomainBed does not know keeps env0, env1, ...
METHODS = ["erm", "rsc"]
TRIALS, SEEDS, STEPS = 3, 3, (0, 300, 600)


def held_out_sets() -> list[tuple[int, ...]]:
    return [(i,) for i in range(3)] + [(0, 1), (0, 2), (1, 2)]


def accuracies(method, trial, seed, envs, step) -> dict:
    """{(env, "in"|"out"): accuracy}, a fixed pseudo-random draw per run and step."""
    rng = random.Random(f"{method}|{trial}|{seed}|{envs}|{step}")
    return {(i, split): round(rng.uniform(0.3, 0.95), 6) for i in range(3) for split in ("in", "out")}


def write_ours(root: Path) -> Path:
    """This project's layout: sweep.json and METHOD/TARGET/tTT-sS/results.json (schema 4)."""
    entries = []
    for method in METHODS:
        for envs in held_out_sets():
            label = "+".join(ENVS[i] for i in envs)
            for trial in range(TRIALS):
                for seed in range(SEEDS):
                    folder = Path(method) / label / f"t{trial:02d}-s{seed}"
                    history = []
                    for step in STEPS:
                        acc = accuracies(method, trial, seed, envs, step)
                        history.append({
                            "step": step, "val_per_domain": {ENVS[j]: acc[j, "out"] for j in range(3) if j not in envs},
                            "val_n": {ENVS[j]: 20 for j in range(3) if j not in envs},
                            "target_acc": {ENVS[t]: acc[t, "in"] for t in envs},
                            "target_out_acc": {ENVS[t]: acc[t, "out"] for t in envs}})
                    (root / folder).mkdir(parents=True)
                    (root / folder / "results.json").write_text(json.dumps({
                        "schema_version": 4, "dataset": "Toy", "arch": "resnet50", "protocol": "domainbed-2020",
                        "targets": [ENVS[t] for t in envs], "sources": [ENVS[j] for j in range(3) if j not in envs],
                        "history": history}))
                    entries.append({"name": f"{method}-{label}-t{trial:02d}-s{seed}", "folder": str(folder),
                                    "method": method, "target": label, "targets": [ENVS[t] for t in envs],
                                    "seed": seed, "trial": trial, "hparams": {"optim.lr": 1e-5 * (trial + 1)}})
    (root / "sweep.json").write_text(json.dumps({"name": "toy", "protocol": "domainbed", "runs": entries}))
    return root


def write_domainbed(root: Path) -> Path:
    """DomainBed's layout: one folder per run with results.jsonl (a record per checkpoint) and done."""
    number = 0
    for method in METHODS:
        for envs in held_out_sets():
            for trial in range(TRIALS):
                for seed in range(SEEDS):
                    folder = root / f"{number:032x}"  # DomainBed names them by an md5 of the arguments
                    number += 1
                    folder.mkdir(parents=True)
                    args = {"dataset": "Toy", "algorithm": method.upper(), "test_envs": list(envs),
                            "hparams_seed": trial, "trial_seed": seed, "holdout_fraction": 0.2}
                    lines = []
                    for step in STEPS:
                        acc = accuracies(method, trial, seed, envs, step)
                        record = {"step": step, "epoch": step / 100, **{f"env{i}_{s}_acc": a for (i, s), a in acc.items()},
                                  "args": args, "hparams": {"lr": 1e-5 * (trial + 1), "batch_size": 32}}
                        lines.append(json.dumps(record, sort_keys=True))
                    (folder / "results.jsonl").write_text("\n".join(lines) + "\n")
                    (folder / "done").write_text("done")
    return root


def domainbed_by_hand(rule: str) -> dict:
    """{(method, test env, trial seed): accuracy} as DomainBed's SelectionMethod.sweep_acc
    defines it, on the records above: within an hparams seed's runs the first step with the best
    val_acc (IID: mean of the other envs' out-split; oracle: the last step, the test env's
    out-split; leave-one-out: the mean over the other envs j of env j's in-split in the run
    testing (t, j)), across hparams seeds the best val_acc (lowest seed on ties), then the test
    env's in-split."""
    result = {}
    for method in METHODS:
        for t in range(3):
            for seed in range(SEEDS):
                best = None
                for trial in range(TRIALS):
                    steps = []
                    for step in STEPS:
                        acc = accuracies(method, trial, seed, (t,), step)
                        if rule == "source_val_mean":
                            val = np.mean([acc[j, "out"] for j in range(3) if j != t])
                        elif rule == "domainbed_oracle":
                            val = acc[t, "out"]
                        else:
                            val = np.sum([accuracies(method, trial, seed, tuple(sorted((t, j))), step)[j, "in"]
                                          for j in range(3) if j != t]) / (3 - 1)
                        steps.append((val, acc[t, "in"]))
                    val, test = steps[-1] if rule == "domainbed_oracle" else max(steps, key=lambda s: s[0])
                    if best is None or val > best[0]:
                        best = (val, test)
                result[method, t, seed] = best[1]
    return result


def format_mean(values) -> str:
    """DomainBed's collect_results.format_mean, in percent with two decimals: mean ± np.std(x / sqrt(n))."""
    mean = 100 * np.mean(values)
    err = 100 * np.std(np.array(values) / np.sqrt(len(values)))
    return f"{mean:.2f} ± {err:.2f}"


def table_lines(text: str) -> list[str]:
    """The per-dataset and averages tables' rows (not the chosen trials, whose hyperparameters
    are named differently in the two layouts)."""
    body = text.split("### Chosen trial")[0]
    return [line for line in body.splitlines() if line.startswith("| ")]


@pytest.fixture(scope="module")
def both_layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_sweeps")
    return write_ours(root / "ours"), write_domainbed(root / "domainbed")


@pytest.mark.parametrize("rule", ["source_val_mean", "leave_one_domain_out", "domainbed_oracle"])
def test_selection_and_standard_errors_match_domainbed_by_hand(both_layouts, rule, capsys):
    ours, domainbed = both_layouts
    expected = domainbed_by_hand(rule)
    assert cli.main([str(ours), "--selection", rule]) == 0
    text = capsys.readouterr().out
    for method in METHODS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {method.upper()} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        means = []
        for t in range(3):
            values = [expected[method, t, s] for s in range(SEEDS)]
            assert cells[t] == f"{format_mean(values)} ({SEEDS}x{TRIALS})", (rule, method, t)
            means.append(100 * np.mean(values))
        assert cells[3] == f"{np.mean(means):.2f}"  # Avg: the mean of the columns, as DomainBed prints it
        # The averages table: per trial seed the mean over test envs, then mean ± SE over seeds.
        averages = [np.mean([expected[method, t, s] for t in range(3)]) for s in range(SEEDS)]
        average_row = [line for line in text.splitlines() if line.startswith(f"| {method.upper()} |")][1]
        assert average_row == f"| {method.upper()} | {format_mean(averages)} ({SEEDS}) | {100 * np.mean(averages):.2f} |"
    assert ("ORACLE" in text) == (rule == "domainbed_oracle")
    # The same sweep in DomainBed's own layout gives the same tables.
    assert cli.main([str(domainbed), "--selection", rule, "--out", str(domainbed.parent / f"db-{rule}")]) == 0
    assert table_lines(capsys.readouterr().out) == table_lines(text)
    # Side by side: one row per source, the same cells.
    assert cli.main([str(ours), str(domainbed), "--selection", rule, "--out", str(ours.parent / "both")]) == 0
    side = capsys.readouterr().out
    for method in METHODS:
        mine = next(line for line in side.splitlines() if line.startswith(f"| {method.upper()} [rsc_dist] |"))
        theirs = next(line for line in side.splitlines() if line.startswith(f"| {method.upper()} [DomainBed] |"))
        assert mine.split("|")[2:] == theirs.split("|")[2:]


def test_latex_csv_and_what_every_table_says(both_layouts, capsys):
    ours, _ = both_layouts
    assert cli.main([str(ours), "--selection", "source_val_mean", "--latex"]) == 0
    latex = capsys.readouterr().out
    assert r"\usepackage{booktabs}" in latex and r"\toprule" in latex and r"\bottomrule" in latex
    assert r"$\pm$" in latex and "(3x3)" in latex
    markdown = (ours / "selection-source_val_mean.md").read_text()
    for words in ("Protocol: domainbed sweep, domainbed-2020", "training-domain validation",
                  "standard error", "n trial seeds, each the best of k trials"):
        assert words in markdown, words
    rows = (ours / "selection-source_val_mean.csv").read_text().splitlines()
    assert rows[0].startswith("table,dataset,metric,protocol,selection,error")
    assert any(row.startswith("selected,Toy,best,") and ",se,runs,ERM,env0," in row for row in rows)


@pytest.mark.parametrize("args, message", [
    (["--selection", "source_val_mean", "--metric", "best"], "--metric: across trials the rule picks"),
    (["--selection", "source_val_mean", "--top5"], "--top5: selection across trials reports top-1"),
])
def test_options_a_sweep_selection_cannot_honour_are_refused(both_layouts, args, message, capsys):
    ours, _ = both_layouts
    assert cli.main([str(ours), *args]) == 2
    assert message in capsys.readouterr().err


def test_domainbed_output_needs_a_rule_and_its_records_have_no_counts(both_layouts, capsys):
    _, domainbed = both_layouts
    assert cli.main([str(domainbed)]) == 2
    assert "DomainBed's sweep output; its tables select across trials" in capsys.readouterr().err
    assert cli.main([str(domainbed), "--selection", "source_val_pooled"]) == 2
    assert "records do not carry" in capsys.readouterr().err


def test_a_rule_across_trials_on_plain_runs_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"algorithm": "erm", "dataset": "Toy", "seed": 0, "targets": ["a"],
                                                  "best": {"target_acc": {"a": 0.5}},
                                                  "last": {"target_acc": {"a": 0.5}}}))
    assert cli.main([str(tmp_path), "--selection", "leave_one_domain_out"]) == 2
    assert "compares the trials of a sweep" in capsys.readouterr().err


def test_an_unfinished_domainbed_run_takes_no_part(tmp_path, capsys):
    root = write_domainbed(tmp_path / "db")
    unfinished = sorted(root.iterdir())[0]
    (unfinished / "done").unlink()
    assert cli.main([str(root), "--selection", "source_val_mean"]) == 0
    runs = len(METHODS) * len(held_out_sets()) * TRIALS * SEEDS
    assert f"1 of {runs} runs of db (DomainBed) are not finished" in capsys.readouterr().out


def test_the_sweep_tables_go_to_wandb_too(both_layouts, monkeypatch, tmp_path):
    """Planted defect: `results SWEEP --selection RULE --wandb` logged nothing and exited 0."""
    import sys
    import types

    logged, summary = {}, {}

    class FakeTable:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class FakeRun:
        def __init__(self):
            self.summary = summary

        def log(self, values):
            logged.update(values)

        def finish(self):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Table=FakeTable, init=lambda **kw: FakeRun()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    ours, _ = both_layouts
    assert cli.main([str(ours), "--selection", "domainbed_oracle", "--wandb", "--out", str(tmp_path)]) == 0
    assert {"results/Toy/selection_domainbed_oracle", "results/averages/selection_domainbed_oracle"} <= set(logged)
    assert summary["results/Toy/selection_domainbed_oracle/selection"] == "domainbed_oracle"
    table = logged["results/Toy/selection_domainbed_oracle"]
    assert "env0 se" in table.columns and [row[0] for row in table.data] == ["ERM", "RSC"]
