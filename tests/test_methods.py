"""Every registered method (rsc_dist.methods): the registry feeds the config, draws are pure,
the meter logs each method's metrics. The training checks over every method (2 ranks == 1
process, resumed == uninterrupted, elastic, ZeRO-2 == DDP) are tests/test_method_suite.py."""


import pytest
import torch
from accelerate import Accelerator

from rsc_dist import methods, train
from rsc_dist.config import load_config, trajectory_settings
from rsc_dist.methods.base import MethodContext
from rsc_dist.observe.meter import Meter


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
    """Draws are a pure function of (seed, step, sample identities): a method built again (a
    resume) or holding a part of the batch (a rank) draws the same."""
    config = load_config("demo", [f"--algorithm={name}", "--rsc.strategy=random"])
    ids = torch.arange(8, dtype=torch.int64) * 7919

    def build():
        return methods.build(name, getattr(config, name, None), MethodContext(seed=config.run.seed, num_domains=4,
                                                                              num_classes=5, feature_dim=8,
                                                                              balanced=True))
    method, rebuilt = build(), build()
    for step in (0, 5, 77):
        whole = method.draws(step, 27, ids)
        again = rebuilt.draws(step, 27, ids.clone())
        halves = [method.draws(step, 27, part) for part in ids.split(4)]
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
