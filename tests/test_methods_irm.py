"""IRM against a plain single-process implementation of DomainBed's ``IRM.update``: the IRMv1
penalty through autograd of a dummy scale (create_graph) on the [::2] / [1::2] halves of each
domain's minibatch, the weight 1 before the anneal step, and Adam created anew at it."""

import pytest
import torch
import torch.nn.functional as F
from torch import autograd

from rsc_dist.methods.irm import cross_entropy_and_scale_gradient
from support.method_reference import LAYOUTS, assert_matches_reference, train_method, train_reference

PENALTY_WEIGHT, ANNEAL = 7.0, 1  # steps 0 (weight 1), 1 (the switch, a fresh Adam), 2


def irm_penalty(logits, y):
    """DomainBed's IRM._irm_penalty: the product of the scale's gradients on the two halves."""
    scale = torch.tensor(1.0, dtype=logits.dtype, requires_grad=True)
    loss_1 = F.cross_entropy(logits[::2] * scale, y[::2])
    loss_2 = F.cross_entropy(logits[1::2] * scale, y[1::2])
    grad_1 = autograd.grad(loss_1, [scale], create_graph=True)[0]
    grad_2 = autograd.grad(loss_2, [scale], create_graph=True)[0]
    return grad_1 * grad_2


def irm_update(network, minibatches, step):
    """DomainBed's IRM.update up to the backward: the loss and the penalty."""
    penalty_weight = PENALTY_WEIGHT if step >= ANNEAL else 1.0
    all_logits = network(torch.cat([x for x, _ in minibatches]))
    nll, penalty, start = 0.0, 0.0, 0
    for x, y in minibatches:
        logits = all_logits[start:start + len(x)]
        start += len(x)
        nll += F.cross_entropy(logits, y)
        penalty += irm_penalty(logits, y)
    nll, penalty = nll / len(minibatches), penalty / len(minibatches)
    return nll + penalty_weight * penalty, {"irm_penalty": penalty}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_irm_is_domainbeds_update(layout):
    ours = train_method("irm", {"penalty_weight": PENALTY_WEIGHT, "anneal_steps": ANNEAL}, layout)
    reference = train_reference(ours["start"], layout, irm_update, fresh_adam_at=ANNEAL)
    assert_matches_reference(ours, reference)


def test_the_optimizer_reset_is_what_matches(monkeypatch):
    """Without the reset at the switch (Adam's moments kept) the run ends elsewhere: the
    comparison above sees the reset."""
    from support.method_reference import RecordingRunner

    monkeypatch.setattr(RecordingRunner, "reset_optimizer_state", lambda self: None)
    ours = train_method("irm", {"penalty_weight": PENALTY_WEIGHT, "anneal_steps": ANNEAL}, "balanced")
    reference = train_reference(ours["start"], "balanced", irm_update, fresh_adam_at=ANNEAL)
    assert not torch.allclose(ours["state"]["head.fc.weight"], reference["weights"]["head.fc.weight"])


def test_the_closed_form_scale_gradient_is_autograds():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (7,), generator=g)
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    per_sample = F.cross_entropy(logits * scale, labels, reduction="none")
    expected = torch.stack([autograd.grad(value, scale, retain_graph=True)[0] for value in per_sample])
    cross_entropy, scale_gradient = cross_entropy_and_scale_gradient(logits, labels)
    torch.testing.assert_close(scale_gradient, expected)
    torch.testing.assert_close(cross_entropy, per_sample.detach())


def test_defaults_and_sweep_space_are_domainbeds(tmp_path):
    from rsc_dist.methods.irm import IRMConfig
    from support.method_reference import default_space_trials

    assert (IRMConfig().penalty_weight, IRMConfig().anneal_steps) == (1e2, 500)  # irm_lambda, irm_penalty_anneal_iters
    trials = default_space_trials("irm", tmp_path)
    weights = [t["irm.penalty_weight"] for t in trials]
    anneals = [t["irm.anneal_steps"] for t in trials]
    assert all(0.1 <= w <= 1e5 for w in weights) and min(weights) < 10 < 1e3 < max(weights)  # 10^U(-1, 5)
    assert all(isinstance(a, int) and 1 <= a < 10**4 for a in anneals) and min(anneals) < 10 and max(anneals) > 1000
