"""VREx against a plain single-process implementation of DomainBed's ``VREx.update``: the mean of
the per-domain losses plus the weight times their (population) variance, the weight 1 before the
anneal step, and Adam created anew at it."""

import pytest
import torch
import torch.nn.functional as F

from support.method_reference import LAYOUTS, assert_matches_reference, train_method, train_reference

PENALTY_WEIGHT, ANNEAL = 30.0, 1  # steps 0 (weight 1), 1 (the switch, a fresh Adam), 2


def vrex_update(network, minibatches, step):
    """DomainBed's VREx.update up to the backward: the loss and the penalty."""
    penalty_weight = PENALTY_WEIGHT if step >= ANNEAL else 1.0
    all_logits = network(torch.cat([x for x, _ in minibatches]))
    losses, start = [], 0
    for x, y in minibatches:
        losses.append(F.cross_entropy(all_logits[start:start + len(x)], y))
        start += len(x)
    losses = torch.stack(losses)
    mean = losses.mean()
    penalty = ((losses - mean) ** 2).mean()
    return mean + penalty_weight * penalty, {"vrex_penalty": penalty}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vrex_is_domainbeds_update(layout):
    ours = train_method("vrex", {"penalty_weight": PENALTY_WEIGHT, "anneal_steps": ANNEAL}, layout)
    reference = train_reference(ours["start"], layout, vrex_update, fresh_adam_at=ANNEAL)
    assert_matches_reference(ours, reference)
    assert reference["values"][0]["vrex_penalty"] > 0


def test_defaults_and_sweep_space_are_domainbeds(tmp_path):
    from rsc_dist.methods.vrex import VRExConfig
    from support.method_reference import default_space_trials

    assert (VRExConfig().penalty_weight, VRExConfig().anneal_steps) == (1e1, 500)  # vrex_lambda, ..._anneal_iters
    trials = default_space_trials("vrex", tmp_path)
    weights = [t["vrex.penalty_weight"] for t in trials]
    anneals = [t["vrex.anneal_steps"] for t in trials]
    assert all(0.1 <= w <= 1e5 for w in weights) and min(weights) < 10 < 1e3 < max(weights)  # 10^U(-1, 5)
    assert all(isinstance(a, int) and 1 <= a < 10**4 for a in anneals) and min(anneals) < 10 and max(anneals) > 1000
