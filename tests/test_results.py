"""rsc_dist.results on runs written by the test: values, mean/std, Markdown/CSV, errors."""

import csv
import json
import statistics
import sys
import types

import pytest

from rsc_dist.core.contracts import RESULTS_FILE
from rsc_dist.results import cli
from rsc_dist.results import tables as results


def write_run(root, algorithm, target, seed, best, last, *, dataset="PACS", arch="resnet18",
              mode="spatial+channel", top5=None, folder=None):
    run_dir = root / (folder or f"{algorithm}/{target}/seed{seed}")
    run_dir.mkdir(parents=True)
    body = {
        "config": {"algorithm": algorithm, "preset": "pacs_resnet18", "run": {"seed": seed},
                   "model": {"arch": arch}, "rsc": {"mode": mode, "p_batch": 1 / 3},
                   "data": {"target": [target], "root": f"/shards/{seed}"}},
        "algorithm": algorithm, "dataset": dataset, "arch": arch, "targets": [target], "seed": seed,
        "best": {"step": 100, "val_acc": 0.9, "target_acc": {target: best}},
        "last": {"step": 200, "val_acc": 0.8, "target_acc": {target: last}},
        "throughput_img_s": 123.0,
    }
    if top5 is not None:
        body["best"]["target_top5"] = {target: top5}
        body["last"]["target_top5"] = {target: top5}
    (run_dir / RESULTS_FILE).write_text(json.dumps(body))
    return run_dir / RESULTS_FILE


# target -> seed -> (best, last)
RSC = {"art_painting": {0: (0.80, 0.78), 1: (0.84, 0.80), 2: (0.83, 0.79)},
       "sketch": {0: (0.79, 0.75), 1: (0.81, 0.77), 2: (0.80, 0.74)}}
ERM = {"art_painting": {0: (0.77, 0.76), 1: (0.79, 0.78)},
       "sketch": {0: (0.70, 0.69), 1: (0.72, 0.70)}}


@pytest.fixture
def runs(tmp_path):
    for algorithm, table in (("rsc", RSC), ("erm", ERM)):
        for target, seeds in table.items():
            for seed, (best, last) in seeds.items():
                write_run(tmp_path, algorithm, target, seed, best, last)
    return tmp_path


def table(tables, metric, dataset="PACS"):
    (t,) = [t for t in tables if t.metric == metric and t.dataset == dataset]
    return t


def test_cells_are_mean_and_sample_std_over_seeds_in_percent(runs):
    tables = results.build_tables(results.find_runs(runs))
    best = table(tables, "best")
    assert best.columns == ["art_painting", "sketch", "Avg"]  # the paper's domain order
    assert list(best.rows) == ["ERM", "RSC"]  # ERM (the baseline) first
    cell = best.rows["RSC"]["art_painting"]
    expected = [100 * RSC["art_painting"][s][0] for s in (0, 1, 2)]
    assert cell.n == 3
    assert cell.mean == pytest.approx(statistics.fmean(expected))
    assert cell.err == pytest.approx(statistics.stdev(expected))
    # Avg: the mean of the per-target means; std over the seeds' own averages.
    avg = best.rows["RSC"]["Avg"]
    per_seed = [100 * (RSC["art_painting"][s][0] + RSC["sketch"][s][0]) / 2 for s in (0, 1, 2)]
    assert avg.mean == pytest.approx(statistics.fmean(per_seed))
    assert avg.err == pytest.approx(statistics.stdev(per_seed))
    assert avg.n == 3
    last = table(tables, "last")
    assert last.rows["ERM"]["sketch"].mean == pytest.approx(100 * (0.69 + 0.70) / 2)


def test_markdown_and_csv_files(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    assert cli.main([str(runs), "--out", str(out), "--paper"]) == 0
    md = (out / "results.md").read_text()
    rsc_art = [100 * RSC["art_painting"][s][0] for s in (0, 1, 2)]
    expected = f"{statistics.fmean(rsc_art):.2f} ± {statistics.stdev(rsc_art):.2f} (3)"
    assert "| method | art_painting | sketch | Avg |" in md
    rsc_line = next(line for line in md.splitlines() if line.startswith("| RSC |"))
    assert rsc_line.split(" | ")[1] == expected
    # Old files (no "selection" key) were chosen by the pooled source validation: the title says so.
    assert "best source-val step (pooled sources, released code)" in md and "last step" in md
    # The paper's rows for PACS ResNet-18, only for the columns the runs have.
    assert "| paper: RSC | 83.43 | 80.85 | 85.15 |" in md
    assert "| paper: ERM | 78.96 | 70.59 | 79.94 |" in md

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["metric"], r["selection"]) for r in rows} == {("best", "source_val_pooled"), ("last", "last")}
    erm_sketch_last = [r for r in rows if (r["metric"], r["method"], r["column"]) == ("last", "ERM", "sketch")]
    assert len(erm_sketch_last) == 1
    assert float(erm_sketch_last[0]["mean"]) == pytest.approx(69.5)
    assert erm_sketch_last[0]["error"] == "std"
    assert float(erm_sketch_last[0]["err"]) == pytest.approx(statistics.stdev([69.0, 70.0]), abs=1e-4)
    assert erm_sketch_last[0]["n"] == "2"
    paper = [r for r in rows if r["source"] == "paper" and r["column"] == "Avg" and r["metric"] == "best"]
    assert {r["method"]: float(r["mean"]) for r in paper} == {"paper: ERM": 79.94, "paper: RSC": 85.15}


def test_domainbeds_standard_error_on_request(runs, tmp_path, capsys):
    assert cli.main([str(runs), "--error", "se", "--metric", "best", "--out", str(tmp_path / "o")]) == 0
    rsc_art = [100 * RSC["art_painting"][s][0] for s in (0, 1, 2)]
    se = statistics.pstdev(rsc_art) / len(rsc_art) ** 0.5  # DomainBed: np.std(x / sqrt(n))
    text = capsys.readouterr().out
    assert f"| RSC | {statistics.fmean(rsc_art):.2f} ± {se:.2f} (3) |" in text and "standard error" in text


def test_metric_option_limits_the_tables(runs, tmp_path):
    assert cli.main([str(runs), "--metric", "last", "--out", str(tmp_path / "o")]) == 0
    md = (tmp_path / "o" / "results.md").read_text()
    assert "last step" in md and "best source-validation" not in md


def test_rows_split_by_config_that_varies_but_not_by_paths_or_seeds(tmp_path):
    write_run(tmp_path, "rsc", "sketch", 0, 0.8, 0.8, mode="spatial", folder="a")
    write_run(tmp_path, "rsc", "sketch", 1, 0.7, 0.7, mode="spatial", folder="b")
    write_run(tmp_path, "rsc", "sketch", 0, 0.6, 0.6, mode="channel", folder="c")
    write_run(tmp_path, "erm", "sketch", 0, 0.5, 0.5, mode="channel", folder="d")
    t = table(results.build_tables(results.find_runs(tmp_path)), "best")
    # data.root differs per seed and does not split rows; rsc.mode does, and only for RSC.
    assert list(t.rows) == ["ERM", "RSC (mode=channel)", "RSC (mode=spatial)"]
    assert t.rows["RSC (mode=spatial)"]["sketch"].n == 2


def test_rows_split_on_exactly_the_trajectory_settings_that_differ(tmp_path):
    """Planted defect: a weight-decay grid (spec.py's own example) exited 2 with "duplicates",
    since only a fixed list of keys split rows. Now every trajectory setting does, and the
    number of processes does not when the global batch is the same."""
    def run(folder, seed, weight_decay, world_size, global_batch):
        path = write_run(tmp_path, "rsc", "sketch", seed, 0.8, 0.8, folder=folder)
        data = json.loads(path.read_text())
        data["config"]["optim"] = {"weight_decay": weight_decay, "momentum": 0.9}
        data["config"]["data"]["batch_size"] = global_batch // world_size  # the per-process setting
        data.update(schema_version=4, world_size=world_size, global_batch=global_batch)
        path.write_text(json.dumps(data))

    run("a", 0, 0.0, 1, 32)
    run("b", 1, 0.0, 2, 32)  # another seed on 2 processes, the same global batch: the same row
    run("c", 0, 5e-4, 1, 32)
    run("d", 0, 5e-4, 2, 64)  # a larger global batch: another trajectory
    t = table(results.build_tables(results.find_runs(tmp_path)), "best")
    assert sorted(t.rows) == ["RSC (global_batch=32, optim.weight_decay=0)",
                              "RSC (global_batch=32, optim.weight_decay=0.0005)",
                              "RSC (global_batch=64, optim.weight_decay=0.0005)"]
    assert t.rows["RSC (global_batch=32, optim.weight_decay=0)"]["sketch"].n == 2


def test_avg_without_std_when_targets_have_different_seeds(tmp_path):
    write_run(tmp_path, "rsc", "sketch", 0, 0.8, 0.8)
    write_run(tmp_path, "rsc", "sketch", 1, 0.6, 0.6)
    write_run(tmp_path, "rsc", "photo", 0, 0.9, 0.9)
    avg = table(results.build_tables(results.find_runs(tmp_path)), "best").rows["RSC"]["Avg"]
    assert avg.mean == pytest.approx((70.0 + 90.0) / 2)
    assert avg.err is None and "seeds differ" in avg.text()


def test_top5_tables_on_request(tmp_path):
    write_run(tmp_path, "erm", "imagenet_sketch", 0, 0.12, 0.12, dataset="imagenet", arch="alexnet", top5=0.25)
    runs = results.find_runs(tmp_path)
    assert [t.metric for t in results.build_tables(runs)] == ["best", "last"]  # top-5 on request
    tables = results.build_tables(runs, paper=True, top5=True)
    top5 = table(tables, "best+top5", "imagenet")
    assert top5.rows["ERM"]["imagenet_sketch"].mean == pytest.approx(25.0)
    assert ("paper: ERM", {"Avg": 24.80}) in top5.paper_rows
    assert "top-5" in top5.markdown()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("seed"), "missing key 'seed'"),
    (lambda d: d["best"]["target_acc"].clear(), "missing key 'best.target_acc.sketch'"),
    (lambda d: d["last"]["target_acc"].update(sketch=83.4), "'last.target_acc.sketch' must be a fraction"),
    (lambda d: d.update(targets=[]), "'targets' must be a non-empty list"),
    (lambda d: d.update(seed="0"), "'seed' must be int"),
])
def test_malformed_results_name_the_file_and_key(tmp_path, capsys, mutate, message):
    good = write_run(tmp_path, "rsc", "photo", 0, 0.8, 0.8)
    bad = write_run(tmp_path, "rsc", "sketch", 0, 0.8, 0.8)
    data = json.loads(bad.read_text())
    mutate(data)
    bad.write_text(json.dumps(data))
    with pytest.raises(results.ResultsError, match=message) as err:
        results.find_runs(tmp_path)
    assert str(bad) in str(err.value) and str(good) not in str(err.value)
    assert cli.main([str(tmp_path)]) == 2
    assert str(bad) in capsys.readouterr().err


def test_schema_versions_1_to_4_read_newer_refused(tmp_path):
    v1 = write_run(tmp_path, "rsc", "sketch", 0, 0.8, 0.7)
    v2 = write_run(tmp_path, "rsc", "photo", 0, 0.9, 0.9)
    data = json.loads(v2.read_text())
    data.update(schema_version=2, fingerprint="0123abcd", best_checkpoint="checkpoints/best")
    data["best"]["num_samples"] = {"val": 10, "photo": 5}
    v2.write_text(json.dumps(data))
    runs = {r.path: r for r in results.find_runs(tmp_path)}
    assert runs[v1].acc["best"] == {"sketch": 0.8} and runs[v2].acc["last"] == {"photo": 0.9}
    for version, message in ((5, "schema_version 5 is newer than this rsc_dist understands"),
                             ("2", "'schema_version' must be a positive integer")):
        data["schema_version"] = version
        v2.write_text(json.dumps(data))
        with pytest.raises(results.ResultsError, match=message) as err:
            results.find_runs(tmp_path)
        assert str(v2) in str(err.value)


def test_a_table_says_when_its_runs_differ_in_world_size_or_threads(tmp_path):
    """The same setting run on 1 and 2 ranks (or with other CPU thread counts: other float
    rounding) shares a row; a line of the table's description says how the runs differ (schema
    4's provenance; older files count as unknown)."""
    paths = [write_run(tmp_path, "rsc", "sketch", seed, 0.8, 0.7) for seed in range(3)]
    for path, (world_size, threads) in zip(paths[:2], ((1, 2), (2, 1))):
        data = json.loads(path.read_text())
        data.update(schema_version=4, provenance={"world_size": world_size, "threads_per_rank": threads})
        path.write_text(json.dumps(data))
    (best,) = [t for t in results.build_tables(results.find_runs(tmp_path)) if t.metric == "best"]
    assert list(best.rows) == ["RSC"] and best.rows["RSC"]["sketch"].n == 3
    assert best.note == ("Runs differ in world size 1 (1 run(s)), 2 (1 run(s)), unknown (1 run(s)); CPU threads "
                         "per rank 1 (1 run(s)), 2 (1 run(s)), unknown (1 run(s)) (results.json provenance).")
    assert f"{best.note}  \n" in best.markdown()
    paths[2].unlink()  # the two schema-4 runs: equal world sizes now, threads still differ
    data = json.loads(paths[1].read_text())
    data["provenance"]["world_size"] = 1
    paths[1].write_text(json.dumps(data))
    (best,) = [t for t in results.build_tables(results.find_runs(tmp_path)) if t.metric == "best"]
    assert best.note == "Runs differ in CPU threads per rank 1 (1 run(s)), 2 (1 run(s)) (results.json provenance)."
    data["provenance"]["threads_per_rank"] = 2
    paths[1].write_text(json.dumps(data))
    (best,) = [t for t in results.build_tables(results.find_runs(tmp_path)) if t.metric == "best"]
    assert best.note == "" and "Runs differ" not in best.markdown()


def test_invalid_json_and_empty_folder(tmp_path):
    with pytest.raises(results.ResultsError, match="no results.json under"):
        results.find_runs(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / RESULTS_FILE).write_text("{not json")
    with pytest.raises(results.ResultsError, match=r"x/results.json: not valid JSON"):
        results.find_runs(tmp_path)


def test_duplicate_seed_is_an_error_naming_both_files(tmp_path):
    a = write_run(tmp_path, "rsc", "sketch", 0, 0.8, 0.8, folder="sweep1/run")
    b = write_run(tmp_path, "rsc", "sketch", 0, 0.7, 0.7, folder="sweep2/run")
    with pytest.raises(results.ResultsError, match="duplicates") as err:
        results.build_tables(results.find_runs(tmp_path))
    assert str(a) in str(err.value) and str(b) in str(err.value)


def test_wandb_skipped_quietly_when_disabled(runs, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setitem(sys.modules, "wandb", None)  # importing it would fail: must not be tried
    assert cli.main([str(runs), "--wandb"]) == 0
    assert "tables not logged" in capsys.readouterr().err


def test_wandb_offline_logs_the_tables_for_a_later_sync(runs, monkeypatch, tmp_path, capsys):
    from support.wandb_records import read_table, summarize

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    out = tmp_path / "out"
    assert cli.main([str(runs), "--wandb", "--paper", "--out", str(out)]) == 0
    assert "wandb sync" in capsys.readouterr().err
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    logged = summarize(run_file)
    assert logged["run"]["job_type"] == "results"
    assert {"results/PACS/best_source_val_pooled", "results/PACS/last"} <= set(logged["tables"])
    assert logged["summary"]["results/PACS/best_source_val_pooled/selection"] == "source_val_pooled"
    table = read_table(run_file, logged["tables"]["results/PACS/best_source_val_pooled"])
    rsc = next(row for row in table["data"] if row[0] == "RSC")
    assert rsc[table["columns"].index("art_painting mean")] == pytest.approx(
        statistics.fmean(100 * RSC["art_painting"][s][0] for s in (0, 1, 2)))
    assert any(row[:2] == ["paper: RSC", "paper"] for row in table["data"])


def test_wandb_logs_one_table_per_dataset_and_metric(runs, monkeypatch):
    logged, finished = {}, []

    class FakeTable:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class FakeRun:
        summary = {}

        def log(self, d):
            logged.update(d)

        def finish(self):
            finished.append(True)

    fake = types.SimpleNamespace(Table=FakeTable, init=lambda **kw: FakeRun())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert cli.main([str(runs), "--wandb", "--paper"]) == 0
    assert sorted(logged) == ["results/PACS/best_source_val_pooled", "results/PACS/last"] and finished
    t = logged["results/PACS/best_source_val_pooled"]
    assert t.columns[:2] == ["method", "source"] and "Avg mean" in t.columns
    rsc = next(row for row in t.data if row[0] == "RSC")
    assert rsc[t.columns.index("art_painting mean")] == pytest.approx(
        statistics.fmean(100 * RSC["art_painting"][s][0] for s in (0, 1, 2)))
    assert any(row[:2] == ["paper: RSC", "paper"] for row in t.data)


def evaluation(step, val, target, val_n=(30, 10)):
    """A schema-3 evaluation record: sources photo (val_n[0] samples) and cartoon (val_n[1])."""
    per_domain = {d: a for d, a, n in zip(("photo", "cartoon"), val, val_n) if n}
    return {"step": step, "val_acc": None, "val_acc_mean": None, "val_per_domain": per_domain,
            "val_n": dict(zip(("photo", "cartoon"), val_n)), "target_acc": {"sketch": target},
            "target_top5": {"sketch": 1.0}, "target_n": {"sketch": 20}}


def write_history_run(root, seed, history, rule="source_val_pooled"):
    from rsc_dist.core import selection

    path = write_run(root, "rsc", "sketch", seed, 0.5, 0.5)
    data = json.loads(path.read_text())
    data.update(schema_version=3, selection=rule, history=history, last=history[-1],
                best=selection.select(history, rule))
    data["config"]["train"] = {"selection": rule}
    path.write_text(json.dumps(data))
    return path


# photo has 30 val samples, cartoon 10: pooled picks step 2, the mean step 1, the oracle step 3.
HISTORY = [evaluation(1, (0.5, 0.9), 0.60), evaluation(2, (0.8, 0.1), 0.50),
           evaluation(3, (0.4, 0.2), 0.90), evaluation(4, (0.3, 0.3), 0.70)]


@pytest.mark.parametrize("rule, step", [("source_val_pooled", 2), ("source_val_mean", 1), ("last", 4),
                                        ("oracle", 3)])
def test_any_rule_applied_after_the_fact_from_the_history(tmp_path, capsys, rule, step):
    write_history_run(tmp_path, 0, HISTORY)
    expected = 100 * HISTORY[step - 1]["target_acc"]["sketch"]
    (run,) = results.find_runs(tmp_path, rule)
    assert run.acc["best"] == {"sketch": HISTORY[step - 1]["target_acc"]["sketch"]} and run.selection == rule
    assert cli.main([str(tmp_path), "--selection", rule, "--metric", "best"]) == 0
    md = capsys.readouterr().out
    assert selection_label(rule) in md and f"| RSC | {expected:.2f} (1) |" in md
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {r["selection"] for r in rows} == {rule}
    if rule == "oracle":
        assert "ORACLE" in md


def selection_label(rule):
    from rsc_dist.core import selection

    return selection.LABELS[rule]


def test_default_is_each_runs_own_rule_and_mixed_rules_are_named(tmp_path, capsys):
    write_history_run(tmp_path, 0, HISTORY, rule="source_val_mean")
    (run,) = results.find_runs(tmp_path)
    assert run.selection == "source_val_mean" and run.acc["best"] == {"sketch": 0.60}
    write_history_run(tmp_path / "pooled", 0, HISTORY, rule="source_val_pooled")
    tables = results.build_tables(results.find_runs(tmp_path))
    best = table(tables, "best")
    assert best.selection == "mixed" and "source_val_mean, source_val_pooled" in best.title
    assert sorted(best.rows) == ["RSC (train.selection=source_val_mean)", "RSC (train.selection=source_val_pooled)"]


def test_a_rule_that_cannot_choose_names_the_file(tmp_path):
    no_cartoon_val = [evaluation(1, (0.5, 0.0), 0.6, val_n=(30, 0))]
    path = write_history_run(tmp_path, 0, no_cartoon_val, rule="source_val_pooled")
    with pytest.raises(results.ResultsError, match="no evaluation has validation samples from every source") as err:
        results.find_runs(tmp_path, "source_val_mean")
    assert str(path) in str(err.value)
    assert results.find_runs(tmp_path, "last")[0].acc["best"] == {"sketch": 0.6}


def test_a_wandb_run_folders_copy_of_results_json_is_not_a_second_run(tmp_path):
    """Planted defect: RUN/wandb/offline-run-*/files/results.json (W&B's link to the run's
    results.json) was read as a second run: "duplicates ..." and exit 2."""
    path = write_history_run(tmp_path, 0, HISTORY)
    files = path.parent / "wandb" / "offline-run-20260101_120000-abc123" / "files"
    files.mkdir(parents=True)
    (files / RESULTS_FILE).symlink_to(path)
    online = path.parent / "wandb" / "run-20260101_130000-def456" / "files"
    online.mkdir(parents=True)
    (online / RESULTS_FILE).write_text(path.read_text())  # a copy, as online runs keep it
    assert [run.path for run in results.find_runs(tmp_path)] == [path]
    assert cli.main([str(tmp_path)]) == 0
    # A folder that only looks like W&B's elsewhere is still read.
    other = write_run(tmp_path / "files-like" / "run-x" / "files", "erm", "sketch", 0, 0.5, 0.5)
    assert other in [run.path for run in results.find_runs(tmp_path)]
