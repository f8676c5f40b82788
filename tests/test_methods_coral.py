"""CORAL's penalty: DomainBed's formula, and exact over the global batch of 2 ranks, including
the gradient that DDP averages."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rsc_dist.methods.coral import coral_penalty
from support.dist_utils import run_on_ranks

NUM_DOMAINS = 4  # index 3 never appears: a held-out target domain


def domainbed_coral(x, y):
    """DomainBed's CORAL.coral (domainbed/algorithms.py), copied as the reference."""
    mean_x = x.mean(0, keepdim=True)
    mean_y = y.mean(0, keepdim=True)
    cent_x = x - mean_x
    cent_y = y - mean_y
    cova_x = (cent_x.t() @ cent_x) / (len(x) - 1)
    cova_y = (cent_y.t() @ cent_y) / (len(y) - 1)
    mean_diff = (mean_x - mean_y).pow(2).mean()
    cova_diff = (cova_x - cova_y).pow(2).mean()
    return mean_diff + cova_diff


def _batch(n=12, d=5):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, d, dtype=torch.float64)
    domains = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 0, 2, 1, 0][:n])
    features[domains == 1] += 1.5  # a mean shift between domains
    return features, domains


def test_penalty_is_domainbeds_mean_over_pairs_of_present_domains():
    features, domains = _batch()
    per_domain = [features[domains == k] for k in range(3)]
    expected = sum(domainbed_coral(per_domain[a], per_domain[b]) for a, b in ((0, 1), (0, 2), (1, 2))) / 3
    torch.testing.assert_close(coral_penalty(features, domains, NUM_DOMAINS).double(), expected)
    # A domain with a single sample has no covariance: it takes part in no pair.
    lone = torch.cat([domains[:11], torch.tensor([3])])
    kept = [features[:11][domains[:11] == k] for k in range(3)]
    expected = sum(domainbed_coral(kept[a], kept[b]) for a, b in ((0, 1), (0, 2), (1, 2))) / 3
    torch.testing.assert_close(coral_penalty(features, lone, NUM_DOMAINS).double(), expected)
    # One domain only: no pair, no penalty (and no NaN).
    assert coral_penalty(features, torch.zeros(12, dtype=torch.long), NUM_DOMAINS).item() == 0.0


SIZES = (5, 7)  # unequal local batches: the gather pads to the larger one


def _featurizer():
    torch.manual_seed(0)
    return nn.Linear(6, 5).double()


def _inputs():
    g = torch.Generator().manual_seed(4)
    n = sum(SIZES)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.arange(n) % 3


def _part(rank):
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


def _ddp_worker(rank, world_size, out_dir):
    x, domains = _inputs()
    part = _part(rank)
    model = DistributedDataParallel(_featurizer())
    penalty = coral_penalty(model(x[part]), domains[part], NUM_DOMAINS, process_group=dist.group.WORLD,
                            capacity=max(SIZES))
    # Every rank: the same global penalty; DDP averages the gradients. Without the all-reduce in
    # the gather's backward, each rank's rows would get half the gradient and this would fail.
    penalty.backward()
    per_rank = coral_penalty(model.module(x[part]), domains[part], NUM_DOMAINS)
    torch.save({"penalty": penalty.detach(), "per_rank": per_rank.detach(),
                "grads": {n: p.grad.clone() for n, p in model.module.named_parameters()}},
               Path(out_dir, f"rank{rank}.pt"))


def test_two_ranks_compute_the_global_penalty_and_its_gradient(tmp_path):
    run_on_ranks(_ddp_worker, 2, str(tmp_path))
    x, domains = _inputs()
    single = _featurizer()
    penalty = coral_penalty(single(x), domains, NUM_DOMAINS)
    penalty.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        torch.testing.assert_close(rank["penalty"], penalty.detach())
        for name, parameter in single.named_parameters():
            assert parameter.grad.abs().sum() > 0
            torch.testing.assert_close(rank["grads"][name], parameter.grad, msg=name)
    # What per-rank CORAL (docs/method.md) would compute instead: each rank's own statistics.
    assert not any(torch.isclose(r["per_rank"], penalty.detach()) for r in ranks)
    expected = [coral_penalty(single(x[_part(r)]), domains[_part(r)], NUM_DOMAINS).detach() for r in range(2)]
    for rank, value in zip(ranks, expected):
        torch.testing.assert_close(rank["per_rank"], value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_penalty_is_float32_and_finite_from_low_precision_features(dtype):
    features, domains = _batch()
    value = coral_penalty(features.to(dtype), domains, NUM_DOMAINS)
    assert value.dtype == torch.float32 and torch.isfinite(value)
