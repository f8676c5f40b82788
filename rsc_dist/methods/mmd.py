"""MMD: matching the source domains' feature distributions with a Gaussian-kernel maximum mean
discrepancy (Li, Pan, Wang and Kot, "Domain Generalization with Adversarial Feature Learning",
CVPR 2018, as DomainBed's ``MMD`` computes it, without the adversarial part).

The loss (DomainBed's ``AbstractMMD.update`` with ``gaussian=True``; penalty weight = its
``mmd_gamma``):

    loss = 1/|D| sum_{a in D} CE_a + gamma * 1/|P| sum_{(a, b) in P} MMD^2(a, b)

over the source domains D present in the step's batch and their pairs P, where CE_a is domain
a's mean cross-entropy and, for domain a's n_a pooled features x_i (the backbone's output
averaged over its locations):

    k(x, y)      = sum_{g in (0.001, 0.01, 0.1, 1, 10, 100, 1000)} exp(-g ||x - y||^2)
    MMD^2(a, b)  = 1/n_a^2 sum_ij k(x_i, x_j) + 1/n_b^2 sum_ij k(y_i, y_j) - 2/(n_a n_b) sum_ij k(x_i, y_j)

(Gretton et al., JMLR 2012: the biased estimate MMD_b, diagonal terms included, as DomainBed). g
multiplies the squared distance; it is not a bandwidth.

EXACT under data parallelism, as CORAL (rsc_dist/methods/coral.py): the kernel sums are over
the GLOBAL batch. Every rank all-gathers every rank's pooled features (one collective), builds
the same global kernel matrix and the same penalty; the gradient reaches each rank's own rows
through the gather (rsc_dist.core.collectives). The per-domain cross-entropies are means over
the global batch too (one all-reduce). Cost: the (global batch)^2 kernel on every rank.

A squared distance is computed as ||x||^2 + ||y||^2 - 2 x.y (DomainBed's ``my_cdist``), whose
rounding on the diagonal (a sample with itself) is about 1e-7 ||x||^2; multiplied by g = 1000
that noise would move the self-kernel terms and their gradient by far more than rounding. The
self-distances are set to exactly 0 here, their value in exact arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rsc_dist.core.fields import setting
from rsc_dist.methods.base import Method, StepOutput
from rsc_dist.methods.domain_statistics import (
    domain_membership,
    domain_risks,
    full_precision,
    gather_domain_rows,
    mean_over_domain_pairs,
    mean_over_present,
    pooled_features,
)

KERNEL_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)  # DomainBed's gaussian_kernel


@dataclass(frozen=True)
class MMDConfig:
    penalty_weight: float = setting(
        1.0, "weight of the Gaussian-kernel MMD between every pair of source domains' pooled features "
        "(DomainBed's mmd_gamma)", check="nonnegative")


class MMD(Method):
    name = "mmd"
    summary = ("MMD: per-domain cross-entropy plus a Gaussian-kernel MMD between every pair of source domains' "
               "features, over the global batch")
    Section = MMDConfig
    metrics = ("mmd_penalty",)
    grad_accum_refusal = ("its penalty compares the domains' features over the whole batch of an update; "
                          "accumulated micro-batches would each compare their own")

    @classmethod
    def sweep_space(cls, preset):
        return {"mmd.penalty_weight": {"log_uniform": [0.1, 10.0]}}  # DomainBed: 10^U(-1, 1)

    def objective(self, network, batch, draws):
        z = network.featurize(batch)
        logits = network.head(z)
        group, num_domains = self.process_group, self.context.num_domains
        risks, counts = domain_risks(logits, batch.labels, batch.domains, num_domains, group)
        penalty = mmd_penalty(pooled_features(z, network.head), batch.domains, num_domains, process_group=group,
                              capacity=self.context.capacity)
        loss = mean_over_present(risks, counts) + self.settings.penalty_weight * penalty
        return StepOutput(loss, logits, {"mmd_penalty": penalty.detach()})


def gaussian_kernel(features: Tensor, gammas=KERNEL_GAMMAS) -> Tensor:
    """(M, M): sum over g of exp(-g ||f_i - f_j||^2), the self-distances exactly 0."""
    squared_norms = features.pow(2).sum(dim=1)
    distances = squared_norms[:, None] + squared_norms[None, :] - 2 * features @ features.T
    eye = torch.eye(features.shape[0], dtype=torch.bool, device=features.device)
    distances = distances.masked_fill(eye, 0.0).clamp_min(1e-30)
    return sum(torch.exp(-gamma * distances) for gamma in gammas)


def mmd_penalty(features: Tensor, domains: Tensor, num_domains: int, *, process_group=None,
                capacity: int | None = None) -> Tensor:
    """The mean squared MMD over pairs of domains present (>= 1 sample) in the global batch.

    ``features`` (N, d) with gradient, ``domains`` (N,) in [0, num_domains); with
    ``process_group``, over the rows of every rank (each padded to ``capacity``). The block sums
    of the kernel matrix per pair of domains come from one product with the one-hot membership.
    """
    if domains is None:
        raise ValueError("MMD needs each training sample's domain (the batch has no 'domain')")
    with full_precision(features):
        features, domain_column = gather_domain_rows(features, domains, process_group, capacity)
        member = domain_membership(domain_column, num_domains)  # (K, M)
        counts = member.sum(dim=1)
        block_sums = member @ gaussian_kernel(features) @ member.T  # (K, K): sum_ij k over domains a x b
        block_means = block_sums / (counts[:, None] * counts[None, :]).clamp(min=1)
        present = (counts >= 1).to(features.dtype)
        return mean_over_domain_pairs(
            lambda a, b: block_means[a, a] + block_means[b, b] - 2 * block_means[a, b], present)
