"""Averages across runs and how averaged models are reported, without training: the soups' math
(uniform mean, Wortsman et al.'s greedy acceptance) and the refusal of runs that do not share
an initialization; averaged and soup rows in rsc_dist.results; the sweep's shared_init. (A soup
of a trained sweep: tests/test_averaging_train.py.)"""

import json

import pytest
import torch

from rsc_dist import soup
from rsc_dist.averaging.soups import greedy_soup, uniform_average
from rsc_dist.core.contracts import RESULTS_FILE
from rsc_dist.results import tables as results
from rsc_dist.sweep.spec import SweepError, load_sweep


def test_the_uniform_soup_is_the_mean_of_its_ingredients():
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=g), "n": torch.tensor(7)} for _ in range(5)]
    soup_state = uniform_average(states)
    assert torch.equal(soup_state["w"], torch.stack([s["w"] for s in states]).double().mean(0).float())
    assert soup_state["n"] == 7
    with pytest.raises(ValueError, match="do not have the same tensors"):
        uniform_average([states[0], {"w": torch.zeros(2)}])


def test_the_greedy_soup_keeps_what_does_not_lower_the_score():
    scores = {("a",): 0.5, ("a", "b"): 0.4, ("a", "c"): 0.5, ("a", "c", "d"): 0.7}
    kept, trace = greedy_soup(["a", "b", "c", "d"], lambda names: scores[tuple(names)])
    assert kept == ["a", "c", "d"]  # b lowers it; c ties (kept, as in Algorithm 1's >=); d raises it
    assert [(t["name"], t["kept"], t["soup_score"]) for t in trace] == [
        ("a", True, 0.5), ("b", False, 0.4), ("c", True, 0.5), ("d", True, 0.7)]


def test_runs_that_start_from_other_weights_are_refused_by_name():
    runs = [{"name": n} for n in ("erm-t00-s0", "erm-t01-s0", "erm-t00-s1")]
    documents = {"erm-t00-s0": {"init_fingerprint": "aa", "seed": 0, "config": {}},
                 "erm-t01-s0": {"init_fingerprint": "aa", "seed": 0, "config": {}},
                 "erm-t00-s1": {"init_fingerprint": "bb", "seed": 1, "config": {}}}
    assert soup.check_same_start(runs[:2], documents) == "aa"
    with pytest.raises(soup.SoupError, match="erm-t00-s0, erm-t01-s0 start from aa \\(random init, run.seed=0\\); "
                                             "erm-t00-s1 start from bb .*shared_init"):
        soup.check_same_start(runs, documents)
    documents["erm-t00-s1"]["init_fingerprint"] = None
    with pytest.raises(soup.SoupError, match="erm-t00-s1 record no initialization fingerprint"):
        soup.check_same_start(runs, documents)


def test_the_soup_command_explains_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    assert soup.main([str(tmp_path)]) == 2
    assert "sweep.json: cannot read the sweep record" in capsys.readouterr().err


# -- averaged models and soups as rows of rsc_dist.results ---------------------------------------


def evaluation(step, target, val=0.5):
    return {"step": step, "val_acc": val, "val_per_domain": {"a": val}, "val_n": {"a": 10},
            "target_acc": {"sketch": target}}


def write_run(root, name, seed, trained, averaged=None, variant=None):
    folder = root / name
    folder.mkdir(parents=True)
    document = {"schema_version": 4, "algorithm": "erm", "dataset": "demo", "arch": "resnet18", "seed": seed,
                "targets": ["sketch"], "selection": "source_val_pooled",
                "config": {"train": {"averaging": "swad" if averaged else "none"}},
                "best": evaluation(4, trained), "last": evaluation(6, trained), "history": [evaluation(4, trained)],
                "averaged": averaged, "variant": variant}
    (folder / RESULTS_FILE).write_text(json.dumps(document))


def test_an_averaged_model_is_a_row_of_its_own(tmp_path, capsys):
    for seed, (trained, average) in enumerate([(0.5, 0.7), (0.6, 0.8)]):
        block = {"kind": "swad", "label": "SWAD", "best": evaluation(6, average), "last": evaluation(6, average),
                 "history": [evaluation(6, average)], "best_checkpoint": None, "window": {}, "note": None}
        write_run(tmp_path, f"swad{seed}", seed, trained, block)
    no_valley = {"kind": "swad", "label": "SWAD", "best": None, "last": None, "history": [], "best_checkpoint": None,
                 "window": {}, "note": "no loss valley: ..."}
    write_run(tmp_path, "swad2", 2, 0.4, no_valley)
    tables = results.build_tables(results.find_runs(tmp_path), metrics=("best",))
    rows = tables[0].rows
    assert list(rows) == ["ERM", "ERM + SWAD"]
    assert rows["ERM"]["sketch"].n == 3 and rows["ERM + SWAD"]["sketch"].n == 2
    assert rows["ERM + SWAD"]["sketch"].mean == pytest.approx(75.0)
    assert "swad2/results.json: no SWAD row: no loss valley" in capsys.readouterr().err
    # --selection RULE chooses from the averaged model's own history
    (_, average) = [r for r in results.find_runs(tmp_path / "swad0", "last")]
    assert average.variant == "SWAD" and average.acc["best"] == {"sketch": 0.7}


def test_plain_models_of_runs_with_and_without_averaging_are_told_apart(tmp_path):
    write_run(tmp_path, "plain", 0, 0.5)
    block = {"kind": "ema", "label": "EMA", "best": evaluation(6, 0.9), "last": evaluation(6, 0.9),
             "history": [evaluation(6, 0.9)], "best_checkpoint": None, "window": {}, "note": None}
    write_run(tmp_path, "ema", 0, 0.55, block)
    document = json.loads((tmp_path / "ema" / RESULTS_FILE).read_text())
    document["config"]["train"]["averaging"] = "ema"
    (tmp_path / "ema" / RESULTS_FILE).write_text(json.dumps(document))
    rows = results.build_tables(results.find_runs(tmp_path), metrics=("best",))[0].rows
    assert sorted(rows) == ["ERM", "ERM (train.averaging=ema)", "ERM + EMA"]


def test_a_soup_is_labelled_with_its_kind_and_size(tmp_path):
    write_run(tmp_path, "run", 0, 0.5)
    write_run(tmp_path, "soups/uniform-s0", 0, 0.6, variant="uniform soup of 8 runs")
    rows = results.build_tables(results.find_runs(tmp_path), metrics=("best",))[0].rows
    assert list(rows) == ["ERM", "ERM + uniform soup of 8 runs"]


# -- the sweep's shared start -------------------------------------------------------------------


def test_shared_init_starts_every_run_from_one_checkpoint(tmp_path):
    start = tmp_path / "lp_run" / "checkpoints" / "best"
    start.mkdir(parents=True)
    (start / "model.safetensors").write_bytes(b"")
    spec = {"preset": "demo", "methods": ["erm"], "seeds": [0, 1], "shared_init": "lp_run",
            "space": {"optim.lr": [0.01, 0.02]}}
    path = tmp_path / "sw.yaml"
    path.write_text(json.dumps(spec))
    sweep = load_sweep(path)
    assert len(sweep.runs) == 4
    assert all(f"--model.pretrained={tmp_path / 'lp_run'}" in run.overrides for run in sweep.runs)
    for change, message in [({"shared_init": "nowhere"}, "shared_init: nowhere does not exist"),
                            ({"overrides": {"model.pretrained": "torchvision"}}, "remove model.pretrained"),
                            ({"shared_init": "."}, "no weights in this folder")]:
        path.write_text(json.dumps({**spec, **change}))
        with pytest.raises(SweepError, match=message):
            load_sweep(path)
