"""Mixup (rsc_dist/methods/mixup.py) against DomainBed's ``Mixup.update`` written out plainly, on
fixed per-domain batches: the objective, the gradient and the weights after 3 steps. Then what
makes it exact on any number of ranks: the pairs are places of the global batch, so the rank
shares of balanced sampling mix exactly the images one process mixes."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rsc_dist import methods
from rsc_dist.core.errors import ConfigError
from rsc_dist.methods.base import MethodContext, StepBatch
from rsc_dist.methods.mixup import Mixup, MixupConfig
from support.reference_updates import (assert_same_parameters, method_network, per_domain_batches, step_batch,
                                      train_method)

NUM_DOMAINS, SOURCES, CLASSES, PER_DOMAIN = 4, (0, 2, 3), 5, 4  # domain 1 is the held-out target
LR, WEIGHT_DECAY, ALPHA = 1e-3, 1e-4, 0.3


def _mixup(grad_accum: int = 1) -> Mixup:
    return Mixup(MixupConfig(alpha=ALPHA), MethodContext(seed=7, num_classes=CLASSES, num_domains=NUM_DOMAINS,
                                                         balanced=True, grad_accum=grad_accum))


def domainbed_mixup_update(network, optimizer, minibatches, cycle, lambdas):
    """DomainBed's Mixup.update with its randomness given: ``cycle`` the order of the minibatches
    (random_pairs_of_minibatches' perm), ``lambdas`` the Beta draw of each pair in turn."""
    objective = 0
    for i in range(len(minibatches)):
        j = i + 1 if i < len(minibatches) - 1 else 0
        (xi, yi), (xj, yj) = minibatches[cycle[i]], minibatches[cycle[j]]
        n = min(len(xi), len(xj))
        xi, yi, xj, yj = xi[:n], yi[:n], xj[:n], yj[:n]
        lam = lambdas[i]
        predictions = network(lam * xi + (1 - lam) * xj)
        objective += lam * F.cross_entropy(predictions, yi)
        objective += (1 - lam) * F.cross_entropy(predictions, yj)
    objective /= len(minibatches)
    optimizer.zero_grad()
    objective.backward()
    grads = {name: p.grad.clone() for name, p in network.named_parameters()}
    optimizer.step()
    return objective.detach(), grads


def test_three_steps_equal_domainbeds_mixup():
    method = _mixup()
    steps = [per_domain_batches(step, SOURCES, PER_DOMAIN, range(CLASSES)) for step in range(3)]
    network, optimizer, start = method_network(method, CLASSES, LR, WEIGHT_DECAY)
    runners = train_method(method, network, optimizer, [step_batch(m, shuffle_seed=s)[0] for s, m in enumerate(steps)])

    reference = copy.deepcopy(start)
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    cycles = set()
    for step, (minibatches, runner) in enumerate(zip(steps, runners)):
        draws = method.draws(step, 100, None)
        # The draws as DomainBed's loop uses them: the training domains in their cyclic order and
        # the lambda of each pair, indexed by the domain that starts it.
        cycle = sorted(range(len(SOURCES)), key=lambda i: draws["cycle_place"][SOURCES[i]])
        lambdas = [torch.tensor(draws["mix_weights"][SOURCES[i]], dtype=torch.float32).item() for i in cycle]
        cycles.add(tuple(cycle))
        loss, grads = domainbed_mixup_update(reference, reference_optimizer, [(m["x"], m["y"]) for m in minibatches],
                                             cycle, lambdas)
        torch.testing.assert_close(runner.loss, loss)
        assert len(runner.updates) == 1
        assert_same_parameters(runner.updates[0], grads)
        torch.testing.assert_close(runner.metrics["mix_weight"], torch.tensor(lambdas).mean())
    assert len(cycles) > 1, "the cyclic order must change between steps for this test to check it"
    assert_same_parameters(network, dict(reference.named_parameters()))
    moved = [n for n, p in network.named_parameters() if not torch.equal(p, dict(start.named_parameters())[n])]
    assert len(moved) == len(list(network.parameters()))


def _with_mirrors(batch: StepBatch, span: int) -> StepBatch:
    """The batch with data.flip_double's mirror copies: another identity, places after every original."""
    return batch.replace(images=torch.cat([batch.images, batch.images.flip(-1)]),
                         labels=torch.cat([batch.labels, batch.labels]), domains=torch.cat([batch.domains] * 2),
                         sample_ids=torch.cat([batch.sample_ids, ~batch.sample_ids]),
                         order=torch.cat([batch.order, batch.order + span]))


def _rank_share(batch: StepBatch, rank: int, world_size: int) -> StepBatch:
    """What rank ``rank`` holds with balanced sampling: its contiguous slice of each domain's places."""
    local = PER_DOMAIN // world_size
    k = batch.order % (len(SOURCES) * PER_DOMAIN) % PER_DOMAIN  # the place within the domain's share
    rows = torch.nonzero((k >= rank * local) & (k < (rank + 1) * local)).flatten()
    return StepBatch(images=batch.images[rows], labels=batch.labels[rows], pixels=batch.pixels,
                     sample_ids=batch.sample_ids[rows], domains=batch.domains[rows], order=batch.order[rows])


@pytest.mark.parametrize("mirrors", [False, True])
def test_two_ranks_mix_the_pairs_of_one_process(mirrors):
    method = _mixup()
    batch, _ = step_batch(per_domain_batches(0, SOURCES, PER_DOMAIN, range(CLASSES)), shuffle_seed=3)
    if mirrors:
        batch = _with_mirrors(batch, len(SOURCES) * PER_DOMAIN)
    draws = method.draws(0, 100, None)
    whole = method.transform_inputs(batch, draws)
    # Sample k of domain d is mixed with sample k (mirror k with mirror k) of the next domain.
    cycle = sorted(SOURCES, key=lambda d: draws["cycle_place"][d])
    following = {d: cycle[(i + 1) % len(cycle)] for i, d in enumerate(cycle)}
    place = {int(p): row for row, p in enumerate(batch.order)}
    for row in range(len(batch.order)):
        d, p = int(batch.domains[row]), int(batch.order[row])
        partner_place = p + (SOURCES.index(following[d]) - SOURCES.index(d)) * PER_DOMAIN
        lam = whole.extras["mix_weight"][row]
        expected = lam * batch.images[row] + (1 - lam) * batch.images[place[partner_place]]
        torch.testing.assert_close(whole.images[row], expected)
        assert whole.extras["partner_labels"][row] == batch.labels[place[partner_place]]
    by_place = {int(p): row for row, p in enumerate(whole.order)}
    for rank in range(2):
        share = method.transform_inputs(_rank_share(batch, rank, 2), draws)
        rows = torch.tensor([by_place[int(p)] for p in share.order])
        torch.testing.assert_close(share.images, whole.images[rows])
        assert torch.equal(share.extras["partner_labels"], whole.extras["partner_labels"][rows])


def test_draws_follow_beta_and_a_uniform_cycle_and_one_update_shares_them():
    method = _mixup()
    draws = [method.draws(step, 100, None) for step in range(3000)]
    weights = np.array([d["mix_weights"] for d in draws]).ravel()
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
    assert abs(weights.mean() - 0.5) < 0.01 and abs(weights.var() - 1 / (4 * (2 * ALPHA + 1))) < 0.01
    firsts = np.bincount([d["cycle_place"].index(0) for d in draws], minlength=NUM_DOMAINS) / len(draws)
    assert np.all(np.abs(firsts - 1 / NUM_DOMAINS) < 0.03)
    accumulating = _mixup(grad_accum=2)
    assert accumulating.draws(4, 100, None) == accumulating.draws(5, 100, None) == method.draws(2, 100, None)
    assert accumulating.draws(5, 100, None) != accumulating.draws(6, 100, None)


def test_merged_sampling_and_a_nonpositive_alpha_are_refused():
    with pytest.raises(ConfigError, match="algorithm=mixup needs data.sampling=balanced"):
        methods.build("mixup", None, MethodContext(num_domains=NUM_DOMAINS, balanced=False))
    with pytest.raises(ConfigError, match=r"mixup.alpha=0.0"):
        Mixup(MixupConfig(alpha=0.0), MethodContext(balanced=True))
