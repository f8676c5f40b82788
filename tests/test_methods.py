"""Every registered method (rsc_dist.methods) through the same checks: 2 ranks reach the
weights of 1 process, a resumed run the weights of an uninterrupted one, and a tiny end-to-end
run writes its results. A new method is covered by registering it."""

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from test_trainer_step_equivalence import compare_ranks

from rsc_dist import methods, train
from rsc_dist.config import load_config, trajectory_settings
from rsc_dist.observe.meter import Meter
from support.trainer_fixtures import tiny_config, tiny_shards  # noqa: F401  (fixture)


def test_the_registry_feeds_the_choices_and_the_config():
    assert set(methods.NAMES) >= {"erm", "rsc", "coral"}
    assert train.parse_args(["--algorithm", "coral"])[0].algorithm == "coral"
    for name, method in methods.METHODS.items():
        config = load_config("demo", [f"--algorithm={name}"])
        if method.Section is not None:
            assert isinstance(getattr(config, name), method.Section)
        # Only the active method's section is part of the trajectory: ERM does not hash rsc.*
        sections = {key.split(".")[0] for key in trajectory_settings(config)}
        assert sections & set(methods.sections()) == ({name} if method.Section is not None else set())
    erm = load_config("demo", ["--algorithm=erm"])
    assert trajectory_settings(erm) == trajectory_settings(load_config("demo", ["--algorithm=erm",
                                                                                 "--rsc.p_batch=0.9"]))


@pytest.mark.parametrize("name", methods.NAMES)
def test_a_method_draws_the_same_on_any_rank_and_after_a_resume(name):
    """Draws are a pure function of (config, step, sample identities)."""
    config = load_config("demo", [f"--algorithm={name}", "--rsc.strategy=random"])
    ids = torch.arange(8, dtype=torch.int64) * 7919
    method = methods.get(name)
    for step in (0, 5, 77):
        whole = method.draws(config, step, 27, ids)
        again = method.draws(config, step, 27, ids.clone())
        halves = [method.draws(config, step, 27, part) for part in ids.split(4)]
        assert whole.keys() == again.keys()
        for key, value in whole.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, again[key]) and torch.equal(value, torch.cat([h[key] for h in halves]))
            else:
                assert value == again[key] == halves[0][key] == halves[1][key]


@pytest.mark.parametrize("name", methods.NAMES)
def test_meter_logs_the_method_metrics(name):
    accelerator = Accelerator(cpu=True)
    metrics = methods.get(name).metrics
    meter = Meter(accelerator, metrics)
    labels = torch.zeros(4, dtype=torch.long)
    out = {"loss": torch.tensor(2.0), "correct": torch.tensor(3),
           "metrics": {m: torch.tensor(0.25) for m in metrics}}
    meter.update(out, type("Inputs", (), {"labels": labels})())
    values = meter.flush(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    assert values["train/loss"] == 2.0 and values["train/acc"] == 0.75
    assert {k for k in values if k.startswith("train/")} == {"train/loss", "train/acc", "train/lr",
                                                              *(f"train/{m}" for m in metrics)}
    assert all(values[f"train/{m}"] == 0.25 for m in metrics)


@pytest.mark.slow
@pytest.mark.parametrize("name", methods.NAMES)
def test_two_ranks_reach_the_weights_of_one_process(trained_on_one_and_two_ranks, name):
    """Through the trainer's step code, the method's defaults (CORAL: statistics over the global
    batch, whose gradient reaches every rank's rows; RSC: global batch selection). Every method
    trains in the same two launches (conftest's session fixture)."""
    compare_ranks(trained_on_one_and_two_ranks, name)


def _final_weights(run_dir: Path) -> dict:
    newest = sorted((run_dir / "checkpoints").glob("checkpoint_*"))[-1]
    return load_file(newest / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("name", methods.NAMES)
def test_resumed_equals_uninterrupted_end_to_end(tmp_path, tiny_shards, name):
    """The tiny demo (32 px, 4 steps) run whole, and cut at step 2 then resumed: the same
    weights and evaluations; the whole run is the method's end-to-end smoke run."""
    config = tiny_config(tmp_path, tiny_shards, data={"image_size": 32},
                         train={"max_steps": 4, "eval_every_steps": 2, "checkpoint_every_steps": 2,
                                "tracker": "none"})
    common = ["--config", str(config), "--algorithm", name]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert train.main(common + ["--output_dir", str(whole)]) == 0
    assert train.main(common + ["--output_dir", str(cut), "--train.stop_at_step=2"]) == 75
    assert train.main(common + ["--output_dir", str(cut)]) == 0

    expected, got = _final_weights(whole), _final_weights(cut)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    results = {d: json.loads((d / "results.json").read_text()) for d in (whole, cut)}
    history = lambda r: [(h["step"], h["val_acc"], h["target_acc"]) for h in r["history"]]
    assert history(results[cut]) == history(results[whole]) and len(history(results[whole])) == 2
    assert results[whole]["algorithm"] == name and results[whole]["config"]["algorithm"] == name
    assert 0 <= results[whole]["last"]["target_acc"]["sketch"] <= 1
