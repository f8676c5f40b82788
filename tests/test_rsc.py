"""rsc_dist.rsc against an independent port of the released code, and its edge cases."""

import math

import pytest
import torch
from torch import nn

from rsc_dist.methods import rsc_masks as rsc
from rsc_dist.methods.rsc_masks import draw_mode, rsc_mask
from rsc_dist.methods.rsc_released import released_mask
from rsc_dist.models.heads import PooledLinearHead


class MLPHead(nn.Module):
    """A non-linear head like AlexNet's: flatten, MLP. Not recognized by the closed form."""

    def __init__(self, c, h, w, k):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 32), nn.ReLU(), nn.Linear(32, k))

    def forward(self, z):
        return self.net(z)


class ClosedFormFree(nn.Module):
    """The same function as a PooledLinearHead, but opaque: forces the autograd path."""

    def __init__(self, head):
        super().__init__()
        self.inner = head

    def forward(self, z):
        return self.inner(z)


def _inputs(n, c, h, w, k=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.relu(torch.randn(n, c, h, w, generator=g, dtype=dtype))
    y = torch.randint(0, k, (n,), generator=g)
    return z, y


def _pooled_head(c, k, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return PooledLinearHead(c, k).to(dtype)


SHAPES = [(1, 8, 7, 7), (2, 16, 7, 7), (5, 32, 14, 14), (16, 24, 6, 6), (33, 16, 7, 9), (64, 64, 7, 7)]
P_VALUES = [(1 / 3, 1 / 3.2, 1 / 3), (0.5, 0.5, 0.5), (0.2, 0.1, 0.25), (0.0, 0.0, 0.0), (0.9, 0.95, 1.0)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["spatial", "channel"])
@pytest.mark.parametrize("ps", P_VALUES)
def test_matches_released_port_pooled_head(shape, mode, ps):
    n, c, h, w = shape
    for seed in range(3):
        z, y = _inputs(n, c, h, w, seed=seed)
        head = _pooled_head(c, 7, seed=seed)
        expected = released_mask(z, head, y, mode, *ps)
        got = rsc_mask(z, head, y, mode=mode, p_spatial=ps[0], p_channel=ps[1], p_batch=ps[2])
        assert got.shape == expected.shape
        assert torch.equal(got, expected), f"seed {seed}: {(got != expected).sum()} entries differ"


@pytest.mark.parametrize("shape", [(3, 8, 6, 6), (12, 16, 7, 9), (40, 8, 5, 5)])
@pytest.mark.parametrize("mode", ["spatial", "channel"])
def test_matches_released_port_mlp_head(shape, mode):
    n, c, h, w = shape
    for seed in range(3):
        z, y = _inputs(n, c, h, w, k=5, seed=seed)
        torch.manual_seed(seed)
        head = MLPHead(c, h, w, 5).double()
        assert torch.equal(rsc_mask(z, head, y, mode=mode), released_mask(z, head, y, mode))


@pytest.mark.parametrize("mode", ["spatial", "channel"])
def test_closed_form_equals_autograd(mode):
    for seed in range(10):
        z, y = _inputs(24, 32, 7, 7, seed=seed)
        head = _pooled_head(32, 7, seed=seed)
        closed = rsc.saliency(z, head, y)
        autograd = rsc.saliency(z, ClosedFormFree(head), y)
        torch.testing.assert_close(closed, autograd, rtol=1e-12, atol=1e-15)
        assert torch.equal(
            rsc_mask(z, head, y, mode=mode), rsc_mask(z, ClosedFormFree(head), y, mode=mode)
        )


def test_mask_shapes_and_dtype():
    z, y = _inputs(4, 8, 7, 9, dtype=torch.float32)
    head = _pooled_head(8, 7, dtype=torch.float32)
    spatial = rsc_mask(z, head, y, mode="spatial")
    channel = rsc_mask(z, head, y, mode="channel")
    assert spatial.shape == (4, 1, 7, 9) and channel.shape == (4, 8, 1, 1)
    assert spatial.dtype == channel.dtype == torch.float32
    assert set(spatial.unique().tolist()) <= {0.0, 1.0}


def test_drop_counts_follow_the_spec():
    """Selected samples mute exactly ceil(n * p) scores (no ties with random inputs)."""
    z, y = _inputs(30, 40, 7, 7)
    head = _pooled_head(40, 7)
    spatial = rsc_mask(z, head, y, mode="spatial", p_batch=1.0)
    channel = rsc_mask(z, head, y, mode="channel", p_batch=1.0)
    dropped_sp = (spatial == 0).flatten(1).sum(1)
    dropped_ch = (channel == 0).flatten(1).sum(1)
    assert set(dropped_sp.tolist()) <= {0, math.ceil(49 / 3)}
    assert set(dropped_ch.tolist()) <= {0, math.ceil(40 / 3.2)}
    assert (dropped_sp > 0).sum() > 0 and (dropped_ch > 0).sum() > 0


def test_p_zero_is_identity():
    z, y = _inputs(10, 16, 7, 7)
    head = _pooled_head(16, 7)
    for mode in ("spatial", "channel"):
        assert torch.all(rsc_mask(z, head, y, mode=mode, p_spatial=0, p_channel=0) == 1)
        assert torch.all(rsc_mask(z, head, y, mode=mode, p_batch=0.0) == 1)


def test_p_near_one_and_single_sample():
    z, y = _inputs(1, 16, 7, 7)
    head = _pooled_head(16, 7)
    for mode in ("spatial", "channel"):
        mask = rsc_mask(z, head, y, mode=mode, p_spatial=0.999, p_channel=0.999, p_batch=0.999)
        assert mask.shape[0] == 1
        # N = 1: tau is the sample's own change, and change > tau never holds.
        assert torch.all(mask == 1)
    z, y = _inputs(8, 16, 7, 7)
    mask = rsc_mask(z, head, y, mode="spatial", p_spatial=0.999, p_batch=0.999)
    # k clamps to n - 1: the smallest score stays, everything else may drop.
    assert (mask == 0).flatten(1).sum(1).max() <= 48


def test_ties_follow_strict_greater_rule():
    """All-equal features and weights: every score ties, nothing is strictly above a threshold."""
    z = torch.ones(6, 8, 7, 7, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    head = _pooled_head(8, 3)
    with torch.no_grad():
        head.fc.weight.fill_(0.5)
    for strategy in ("top_gradient", "top_activation"):
        for mode in ("spatial", "channel"):
            mask = rsc_mask(z, head, y, mode=mode, strategy=strategy, p_batch=1.0)
            assert torch.all(mask == 1), (strategy, mode)


def test_no_parameter_grad_and_mode_kept():
    z, y = _inputs(8, 16, 7, 7, dtype=torch.float32)
    for head in (_pooled_head(16, 7, dtype=torch.float32), MLPHead(16, 7, 7, 7)):
        head.train()
        z_req = z.clone().requires_grad_(True)
        mask = rsc_mask(z_req, head, y, mode="spatial")
        assert all(p.grad is None for p in head.parameters())
        assert z_req.grad is None and not mask.requires_grad
        assert head.training


def test_strategies_differ_and_random_is_seeded():
    z, y = _inputs(16, 32, 7, 7)
    head = _pooled_head(32, 7)
    masks = {
        s: rsc_mask(z, head, y, mode="spatial", strategy=s, p_batch=1.0,
                    generator=torch.Generator().manual_seed(3))
        for s in ("top_gradient", "top_activation", "random")
    }
    assert not torch.equal(masks["top_gradient"], masks["top_activation"])
    assert not torch.equal(masks["top_gradient"], masks["random"])
    again = rsc_mask(z, head, y, mode="spatial", strategy="random", p_batch=1.0,
                     generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, masks["random"])


def test_top_activation_scores_follow_spec():
    z, y = _inputs(4, 8, 5, 5)
    head = _pooled_head(8, 7)
    s_ch, s_sp = rsc.channel_and_spatial_scores(z, head, y, strategy="top_activation")
    torch.testing.assert_close(s_ch, z.mean(dim=(2, 3)))
    torch.testing.assert_close(s_sp, z.mean(dim=1))


def test_bf16_autocast_runs():
    z, y = _inputs(8, 16, 7, 7, dtype=torch.float32)
    head = _pooled_head(16, 7, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask = rsc_mask(z.bfloat16(), head, y, mode="spatial")
    assert mask.dtype == torch.bfloat16 and mask.shape == (8, 1, 7, 7)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda z, h, y: rsc_mask(z[0], h, y, mode="spatial"), "features must be"),
        (lambda z, h, y: rsc_mask(z, h, y[:3], mode="spatial"), "targets must be"),
        (lambda z, h, y: rsc_mask(z, h, y.float(), mode="spatial"), "integer class indices"),
        (lambda z, h, y: rsc_mask(z, h, y + 7, mode="spatial"), "labels out of range"),
        (lambda z, h, y: rsc_mask(z, h, y - 1 - y, mode="channel"), "labels out of range"),
        (lambda z, h, y: rsc_mask(z, lambda t: t.mean(dim=(2, 3))[:, :, None], y, mode="spatial"),
         "head must return logits"),
        (lambda z, h, y: rsc_mask(z, lambda t: t[:2].mean(dim=(2, 3)), y, mode="spatial"),
         "head must return logits"),
        (lambda z, h, y: rsc_mask(z, h, y, mode="spatial+channel"), "draw_mode"),
        (lambda z, h, y: rsc_mask(z, h, y, mode="spatial", strategy="grad"), "strategy"),
        (lambda z, h, y: rsc_mask(z, h, y, mode="spatial", p_batch=1.5), "p_batch"),
    ],
)
def test_clear_errors(call, message):
    z, y = _inputs(4, 8, 7, 7)
    with pytest.raises(ValueError, match=message):
        call(z, _pooled_head(8, 7), y)


def test_draw_mode_is_seeded_and_balanced():
    draws = [draw_mode("spatial+channel", seed=0, step=s) for s in range(2000)]
    again = [draw_mode("spatial+channel", seed=0, step=s) for s in range(2000)]
    other_seed = [draw_mode("spatial+channel", seed=1, step=s) for s in range(2000)]
    assert draws == again and draws != other_seed
    assert 0.45 < draws.count("spatial") / len(draws) < 0.55
    assert draw_mode("channel", seed=0, step=5) == "channel"
    with pytest.raises(ValueError, match="unknown RSC mode"):
        draw_mode("both", seed=0, step=0)


def test_p_batch_schedules():
    released = rsc.p_batch_schedule("released", 1 / 3)
    assert released(0, 0) == pytest.approx(0.3) and released(9, 123) == pytest.approx(0.3)
    assert released(10, 0) == pytest.approx(0.5) and released(29, 0) == pytest.approx(0.7)
    assert released(35, 0) == pytest.approx(0.9)
    assert all(released(e, 0) <= 0.9 for e in range(40, 200))  # released code crashed here
    assert rsc.p_batch_schedule("constant", 0.25)(17, 9) == 0.25
    with pytest.raises(ValueError, match="schedule"):
        rsc.p_batch_schedule("cosine", 0.3)


def test_masked_fraction():
    mask = torch.ones(4, 1, 7, 7)
    mask[1, 0, 2, 2] = 0
    assert rsc.masked_sample_fraction(mask).item() == pytest.approx(0.25)


class DropoutHead(nn.Module):
    """AlexNet-like: dropout in a non-linear head, active in training."""

    def __init__(self, c, k):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(c * 49, 32), nn.ReLU(),
                                 nn.Dropout(0.5), nn.Linear(32, k))

    def forward(self, z):
        return self.net(z)


def test_dropout_head_scoring_uses_one_random_draw():
    """Before/after confidences see the same dropout mask, so an all-ones feature mask changes
    nothing; and the RNG is left as it was (the training pass draws what ERM would)."""
    z, y = _inputs(16, 8, 7, 7, dtype=torch.float32)
    torch.manual_seed(0)
    head = DropoutHead(8, 5).train()
    y = y % 5
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = rsc_mask(z, head, y, mode="spatial", p_batch=1.0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, rsc_mask(z, head, y, mode="spatial", p_batch=1.0))
    # The same input twice under one shared draw: identical confidences (change exactly 0).
    with rsc.same_randomness_per_call(head, z.device) as reset:
        reset()
        before = rsc.true_class_probability(head(z), y)
        reset()
        after = rsc.true_class_probability(head(z), y)
    assert torch.equal(before, after)
