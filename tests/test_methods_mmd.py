"""MMD against a plain single-process implementation of DomainBed's ``MMD.update``: the mean of
the per-domain losses plus the weight times the mean, over pairs of domains, of the biased
Gaussian-kernel MMD^2 with the kernel sum_g exp(-g ||x - y||^2)."""

import pytest
import torch
import torch.nn.functional as F

from rsc_dist.methods.mmd import gaussian_kernel, mmd_penalty
from support.method_reference import LAYOUTS, assert_matches_reference, train_method, train_reference

PENALTY_WEIGHT = 3.0
GAMMAS = (0.001, 0.01, 0.1, 1, 10, 100, 1000)


def kernel(x, y):
    """sum_g exp(-g d^2), the squared distances computed directly (exactly 0 for a sample with
    itself)."""
    distances = (x[:, None, :] - y[None, :, :]).pow(2).sum(-1)
    return sum(torch.exp(-g * distances) for g in GAMMAS)


def mmd(x, y):
    return kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()


def mmd_update(network, minibatches, step):
    """DomainBed's AbstractMMD.update (gaussian) up to the backward: the loss and the penalty."""
    features = [network.features(x).mean(dim=(2, 3)) for x, _ in minibatches]
    objective, penalty, count = 0.0, 0.0, len(minibatches)
    for i in range(count):
        objective += F.cross_entropy(network.head.fc(features[i]), minibatches[i][1])
        for j in range(i + 1, count):
            penalty += mmd(features[i], features[j])
    objective /= count
    penalty /= count * (count - 1) / 2
    return objective + PENALTY_WEIGHT * penalty, {"mmd_penalty": penalty}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mmd_is_domainbeds_update(layout):
    ours = train_method("mmd", {"penalty_weight": PENALTY_WEIGHT}, layout)
    reference = train_reference(ours["start"], layout, mmd_update)
    assert_matches_reference(ours, reference)
    assert reference["values"][0]["mmd_penalty"] > 1e-3


def test_penalty_edge_cases():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(7, 5, generator=g, dtype=torch.float64)
    # One domain: no pair, no penalty; a domain of one sample still has a mean embedding.
    assert mmd_penalty(features, torch.zeros(7, dtype=torch.long), 4).item() == 0.0
    domains = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    a, b, c = features[:3], features[3:6], features[6:]
    expected = (mmd(a, b) + mmd(a, c) + mmd(b, c)) / 3
    torch.testing.assert_close(mmd_penalty(features, domains, 4), expected)
    # A sample's kernel with itself is exactly the number of gammas: ||x||^2 + ||x||^2 - 2 x.x
    # rounds to about 1e-7 ||x||^2 in float32, which g = 1000 would turn into exp(-0.1) or less.
    large = (features * 30).float()
    assert torch.equal(gaussian_kernel(large).diagonal(), torch.full((7,), float(len(GAMMAS))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_penalty_is_float32_under_bf16_autocast(dtype):
    """Kernel distances are computed with autocast off: in bf16 the rounding of ||x||^2 alone
    (about 0.4 % of it) times g = 1000 would swamp every difference between domains."""
    g = torch.Generator().manual_seed(2)
    features = torch.randn(9, 6, generator=g)
    domains = torch.arange(9) % 3
    exact = mmd_penalty(features.double(), domains, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = mmd_penalty(features.to(dtype), domains, 4)
    assert value.dtype == torch.float32
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(value.double(), exact, rtol=tolerance, atol=tolerance)


def test_defaults_and_sweep_space_are_domainbeds(tmp_path):
    from rsc_dist.methods.mmd import KERNEL_GAMMAS, MMDConfig
    from support.method_reference import default_space_trials

    assert MMDConfig().penalty_weight == 1.0 and KERNEL_GAMMAS == GAMMAS  # mmd_gamma; gaussian_kernel's gammas
    weights = [t["mmd.penalty_weight"] for t in default_space_trials("mmd", tmp_path)]
    assert all(0.1 <= w <= 10 for w in weights) and min(weights) < 0.3 and max(weights) > 3  # 10^U(-1, 1)
