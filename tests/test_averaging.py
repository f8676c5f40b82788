"""Weight averaging's rules and tensors on one process, each against an independent reference:
SWAD's loss-valley window against a whole-history implementation of the published rule
written here, EMA against timm's ModelEmaV3, SWA against torch's AveragedModel, BatchNorm
recomputation against torch's update_bn; the averager's checkpoint round trip; the config's
rules and fingerprint. (2 ranks and ZeRO-2: tests/test_method_suite.py; whole runs:
tests/test_averaging_train.py.)"""

import random
import statistics
import types

import pytest
import torch
from torch import nn

from rsc_dist.averaging.averager import Averager
from rsc_dist.averaging.batchnorm import recompute_batchnorm
from rsc_dist.averaging.fragments import Fragments
from rsc_dist.averaging.rules import ACCEPT, LossValley, ema_decay
from rsc_dist.averaging.settings import AveragingConfig
from rsc_dist.config import load_config, trajectory_fingerprint, trajectory_settings
from rsc_dist.core.errors import ConfigError

# -- SWAD: the published rule, written over the whole loss history -------------------------------


def swad_window(losses, n_converge, n_tolerance, ratio, finished=True):
    """(taken segment indices, the evaluation at which the valley ended or None), from the rule
    as Cha et al. define it and the authors' LossValley applies it (docs/method.md): t_s is the
    first segment whose loss is the smallest of the n_converge from it; segments are taken from
    t_s while the smallest loss of the n_tolerance from them stays under (1 + ratio) x the mean
    of the n_converge losses from t_s; up to n_tolerance - n_converge segments before t_s are
    taken back to the last one above that threshold; at the end of training a window is the
    losses that exist."""
    start = next((c for c in range(len(losses) - n_converge + 1)
                  if losses[c] == min(losses[c:c + n_converge])), None)
    if start is None:
        return [], None
    known = start + n_converge - 1  # the evaluation that found t_s
    threshold = (1 + ratio) * statistics.fmean(losses[start:start + n_converge])
    before = []
    for j in range(start - 1, max(known - n_tolerance + 1, 0) - 1, -1):
        if losses[j] > threshold:
            break
        before.insert(0, j)
    taken, ended_at = [], None
    for i in range(start, len(losses)):
        window = losses[i:i + n_tolerance]
        complete = len(window) == n_tolerance
        if not complete and not finished:
            break
        if min(window) > threshold:
            # known at the later of the window's last evaluation and the one that found t_s
            ended_at = max(i + n_tolerance - 1, known) if complete else None
            break
        taken.append(i)
    return before + taken, ended_at


def run_valley(losses, n_converge, n_tolerance, ratio):
    valley = LossValley(n_converge, n_tolerance, ratio)
    ended_at, decided = None, {}
    for k, loss in enumerate(losses):
        for index, decision in valley.add(loss):
            assert index not in decided, f"segment {index} decided twice"
            decided[index] = decision
        if valley.ended and ended_at is None:
            ended_at = k
    for index, decision in valley.finish():
        assert index not in decided
        decided[index] = decision
    assert sorted(decided) == list(range(len(losses))), "every segment is decided exactly once"
    return [i for i, d in sorted(decided.items()) if d == ACCEPT], ended_at, valley


@pytest.mark.parametrize("n_converge, n_tolerance", [(3, 6), (2, 2), (1, 3), (4, 2), (3, 3)])
def test_loss_valley_takes_what_the_published_rule_takes(n_converge, n_tolerance):
    rng = random.Random(n_converge * 10 + n_tolerance)
    for trial in range(300):
        length = rng.randint(1, 18)
        if trial % 3 == 0:  # a valley: falling, flat, rising
            losses = [max(0.05, 2 - 0.3 * i + 0.02 * max(0, i - 8) ** 2 + rng.uniform(-0.1, 0.1)) for i in range(length)]
        else:
            losses = [rng.choice([0.5, 0.6, 1.0]) if trial % 2 else rng.uniform(0.1, 3) for _ in range(length)]
        ratio = rng.choice([0.0, 0.3, 1.0])
        taken, ended_at, _ = run_valley(losses, n_converge, n_tolerance, ratio)
        expected, expected_end = swad_window(losses, n_converge, n_tolerance, ratio)
        assert taken == expected, (losses, ratio)
        assert ended_at == expected_end, (losses, ratio)


def test_loss_valley_defaults_and_the_authors_corner_cases():
    # Converges at evaluation 5 (segment 3 is the smallest of 3..5); segments 0..2 are looked
    # back to, and 1 is above the threshold, so 2 is taken from before t_s; the valley ends at
    # segment 7, decided at evaluation 12 (7 + 6 - 1), which is where training stops.
    losses = [3.0, 9.0, 1.1, 1.0, 1.05, 1.02, 1.1, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 1.0]
    taken, ended_at, valley = run_valley(losses, 3, 6, 0.3)
    assert (valley.converge, ended_at) == (3, 12)
    assert taken == [2, 3, 4, 5, 6]  # each once: the converge segment is not entered twice (issue 28)
    assert valley.threshold == pytest.approx(1.3 * statistics.fmean([1.0, 1.05, 1.02]))
    # Converged at the third evaluation, before six exist: the first segment is taken once,
    # not at every evaluation while the window fills (the authors' code repeats it).
    taken, ended_at, _ = run_valley([1.0, 1.2, 1.3, 1.1, 1.2], 3, 6, 0.3)
    assert taken == [0, 1, 2, 3, 4] and ended_at is None
    # The loss never stops falling: no valley, nothing taken.
    assert run_valley([5.0, 4.0, 3.0, 2.0], 3, 6, 0.3)[:2] == ([], None)


def test_loss_valley_state_round_trips_mid_run():
    losses = [2.0, 1.0, 1.2, 1.1, 0.9, 1.4, 1.0, 3.0, 3.0, 3.0]
    whole = LossValley(3, 4, 0.3)
    decisions = [whole.add(x) for x in losses]
    cut = LossValley(3, 4, 0.3)
    for x in losses[:5]:
        cut.add(x)
    resumed = LossValley.from_state(torch.load(_saved(cut.state_dict()), weights_only=False))
    assert [resumed.add(x) for x in losses[5:]] == decisions[5:]
    assert resumed.state_dict() == whole.state_dict()


def _saved(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# -- the averager's tensors, against timm and torch -----------------------------------------------


class Plain:
    """What Fragments asks of an Accelerator, for one process without a wrapper."""

    @staticmethod
    def unwrap_model(model):
        return model


def toy_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def train_steps(model, steps, seed=1):
    """Plain SGD steps on random data; yields after each optimizer step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(6, 3, 8, 8, generator=g)
        y = torch.randint(0, 3, (6,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        yield step + 1


def averaged(averager):
    return {k: v.clone() for k, v in averager.whole_average().items()}


@pytest.mark.parametrize("warmup, start", [(True, 0), (False, 0), (True, 3)])
def test_ema_follows_timm_model_ema_v3(warmup, start):
    from timm.utils.model_ema import ModelEmaV3

    settings = AveragingConfig(ema_decay=0.9, ema_warmup=warmup, ema_warmup_gamma=1.0, ema_warmup_power=0.75,
                               ema_start_step=start)
    model = toy_model()
    reference = ModelEmaV3(model, decay=0.9, use_warmup=warmup, warmup_gamma=1.0, warmup_power=0.75,
                           update_after_step=start, exclude_buffers=True)
    averager = Averager("ema", settings, Fragments(Plain, model))
    for step in train_steps(model, 9):
        assert ema_decay(step, 0.9, warmup=warmup, gamma=1.0, power=0.75, start=start) == reference.get_decay(step)
        averager.after_optimizer_step(step)
        reference.update(model, step=step)
    expected = dict(reference.module.named_parameters())
    got = averaged(averager)
    assert got.keys() == expected.keys()
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name].detach(), rtol=0, atol=1e-6)
    assert not torch.equal(got["0.weight"], model[0].weight.detach())  # an average, not the weights


def test_swa_is_torchs_averaged_model_from_its_start_step():
    from torch.optim.swa_utils import AveragedModel

    model = toy_model()
    reference = AveragedModel(model, use_buffers=False)
    averager = Averager("swa", AveragingConfig(swa_start_step=4), Fragments(Plain, model))
    for step in train_steps(model, 10):
        averager.after_optimizer_step(step)
        if step >= 4:
            reference.update_parameters(model)
    assert averager.window()["steps_averaged"] == 7 and averager.window()["first_step"] == 4
    expected = dict(reference.module.named_parameters())
    for name, value in averaged(averager).items():
        torch.testing.assert_close(value, expected[name].detach(), rtol=0, atol=1e-6)


def test_swad_averages_every_step_of_the_taken_segments():
    """One scalar parameter whose value after step s is s: the average is then the mean of the
    steps the rule takes, each segment weighed by its steps (segments of 3, 2, 3, ... steps)."""
    param = nn.Parameter(torch.zeros(()))
    holder = nn.Module()
    holder.w = param
    settings = AveragingConfig(swad_n_converge=2, swad_n_tolerance=3, swad_tolerance_ratio=0.3)
    averager = Averager("swad", settings, Fragments(Plain, holder))
    losses = [2.0, 1.0, 1.1, 1.2, 1.0, 3.0, 3.0, 3.0]
    lengths = [3, 2, 3, 1, 2, 3, 2, 2]
    step, segments, ended = 0, [], None
    for k, (loss, length) in enumerate(zip(losses, lengths)):
        first = step + 1
        for _ in range(length):
            step += 1
            param.data.fill_(float(step))
            averager.after_optimizer_step(step)
        segments.append(list(range(first, step + 1)))
        if averager.at_evaluation(step, {"val_loss_mean": loss}) and ended is None:
            ended = k
    averager.finish()
    taken, expected_end = swad_window(losses, 2, 3, 0.3)
    steps = [s for i in taken for s in segments[i]]
    assert ended == expected_end
    assert averager.whole_average()["w"].item() == pytest.approx(statistics.fmean(steps), abs=1e-5)
    window = averager.window()
    assert (window["first_step"], window["last_step"], window["steps_averaged"]) == (steps[0], steps[-1], len(steps))


@pytest.mark.parametrize("kind", ["ema", "swa", "swad"])
def test_the_averager_resumes_bitwise(kind):
    """The same training twice; in the second the averager is saved at step 6 (through
    torch.save, as a checkpoint holds it) and replaced by a new one loaded from that state."""
    settings = AveragingConfig(ema_decay=0.8, swa_start_step=3, swad_n_converge=2, swad_n_tolerance=2)
    losses = {2: 2.0, 4: 1.0, 6: 1.5, 8: 1.4, 10: 1.3, 12: 1.2}

    def run(swap_at=None):
        model = toy_model()
        averager = Averager(kind, settings, Fragments(Plain, model))
        for step in train_steps(model, 12):
            averager.after_optimizer_step(step)
            if step in losses:
                averager.at_evaluation(step, {"val_loss_mean": losses[step]})
            if step == swap_at:
                saved = _saved(averager.state_dict())
                averager = Averager(kind, settings, Fragments(Plain, model))
                averager.load_state_dict(torch.load(saved, weights_only=False))
        averager.finish()
        return averaged(averager), averager.window()

    (whole, whole_window), (resumed, resumed_window) = run(), run(swap_at=6)
    assert whole.keys() == resumed.keys() and whole_window == resumed_window
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


# -- BatchNorm recomputed ----------------------------------------------------------------------


def test_batchnorm_recomputation_is_torchs_update_bn():
    from torch.optim.swa_utils import update_bn

    model = toy_model()
    model[1].running_mean.fill_(5.0)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(5, 3, 8, 8, generator=g) * 2 + 1 for _ in range(4)]
    reference = toy_model()
    reference.load_state_dict(model.state_dict())
    update_bn(batches, reference)
    assert recompute_batchnorm(model, iter(batches)) == 4
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(model[1], name), getattr(reference[1], name), rtol=1e-5, atol=1e-6)
    assert int(model[1].num_batches_tracked) == 4
    assert model.training  # left in the mode it was in


# -- configuration ------------------------------------------------------------------------------


def test_averaging_settings_shape_the_fingerprint_only_when_they_act():
    plain = load_config("demo")
    assert not any("averag" in key for key in trajectory_settings(plain))
    assert trajectory_fingerprint(load_config("demo", ["--averaging.ema_decay=0.5"]), 1) == trajectory_fingerprint(plain, 1)
    ema = load_config("demo", ["--train.averaging=ema"])
    assert trajectory_fingerprint(ema, 1) != trajectory_fingerprint(plain, 1)
    assert trajectory_fingerprint(load_config("demo", ["--train.averaging=ema", "--averaging.ema_decay=0.5"]), 1) \
        != trajectory_fingerprint(ema, 1)
    # Another kind's parameters do not move an EMA run to another folder.
    assert trajectory_fingerprint(load_config("demo", ["--train.averaging=ema", "--averaging.swad_n_converge=5"]),
                                  1) == trajectory_fingerprint(ema, 1)


def test_averaging_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="averaging.ema_warmup_power must be > 0"):
        load_config("demo", ["--train.averaging=ema", "--averaging.ema_warmup_power=0"])
    with pytest.raises(ConfigError, match="train.averaging must be one of"):
        load_config("demo", ["--train.averaging=swag"])
    from rsc_dist.trainer.averaged import check_averaging_data

    manifest = types.SimpleNamespace(root="/data/x", num_samples=lambda d, split: 0 if d == "b" else 5)
    plan = types.SimpleNamespace(sources=("a", "b"), manifest=manifest, total_steps=10)
    with pytest.raises(ConfigError, match="swad reads the source validation loss.*domain\\(s\\) b have 0 val"):
        check_averaging_data(load_config("demo", ["--train.averaging=swad"]), plan)
    with pytest.raises(ConfigError, match="swa_start_step=10 is not before the run's last step"):
        check_averaging_data(load_config("demo", ["--train.averaging=swa", "--averaging.swa_start_step=10"]), plan)


def test_the_averaging_benchmark_prints_its_table(capsys, tmp_path):
    from rsc_dist import bench_averaging

    results = bench_averaging.main(["--resolution", "16", "--batch", "2", "--rounds", "2", "--steps", "2",
                                    "--warmup", "1", "--eval-every", "2", "--json", str(tmp_path / "out.json")])
    (result,) = results
    assert set(result["kinds"]) == {"ema", "swad"} and result["erm_ms_per_step"] > 0
    assert all(row["update_ms"] > 0 for row in result["kinds"].values())
    assert "| resnet18 | 16 | 2 |" in capsys.readouterr().out and (tmp_path / "out.json").is_file()
