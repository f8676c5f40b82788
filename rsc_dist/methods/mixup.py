"""Mixup between domains: DomainBed's ``Mixup`` (inter-domain mixup; Xu et al., AAAI 2020,
arXiv:2001.00677; Yan et al., arXiv:1912.01805; Zhang et al., ICLR 2018 for mixup itself).

Each step the training domains are put in a random cyclic order d_1, ..., d_S, and every
domain is paired with the next one (d_S with d_1). Pair i draws one weight
lambda_i ~ Beta(alpha, alpha) and mixes sample k of d_i with sample k of d_{i+1}:

    x~_k = lambda_i x_{d_i,k} + (1 - lambda_i) x_{d_{i+1},k}        (mixup's vicinal sample, Zhang et al. Sec. 2)
    L    = 1/S sum_i 1/n sum_k [ lambda_i CE(f(x~_k), y_{d_i,k})
                                 + (1 - lambda_i) CE(f(x~_k), y_{d_{i+1},k}) ]

which, with n samples per domain, is the mean over the step's mixed samples of their
lambda-weighted pair of cross-entropies (DomainBed's ``Mixup.update`` sums the pairs' mean
losses and divides by the number of domains).

EXACT under data parallelism: the cyclic order and the lambdas are pure functions of (seed,
optimizer step) (``draws``), and "sample k of a domain" is a place in the GLOBAL batch
(StepBatch.order), not a row of the local batch. With balanced sampling every rank holds the
same positions k of every domain, so each image's partner is on its own rank and the mixing
needs no communication; 2 ranks mix exactly the pairs 1 process mixes. The loss is each rank's
mean, which DDP's average turns into the mean over the global batch (every rank holds as many
samples). Under ``data.sampling=merged`` a step has no "sample k of each domain": refused.
With ``data.flip_double`` a domain's samples are its images, then their mirror images, and
mirror k is paired with mirror k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rsc_dist.core.errors import ConfigError
from rsc_dist.core.fields import setting
from rsc_dist.core.seeding import mix_seed
from rsc_dist.methods.base import Method

_DRAW_SALT = 0x4D495855  # separates Mixup's draws from other seeded draws of the same (seed, step)


@dataclass(frozen=True)
class MixupConfig:
    alpha: float = setting(0.2, "mixing weights ~ Beta(alpha, alpha), one per pair of domains and step "
                                "(DomainBed's mixup_alpha; > 0)")


class Mixup(Method):
    name = "mixup"
    summary = ("inter-domain Mixup (DomainBed): each domain's images mixed with the next domain's in a "
               "random cyclic order, Beta(alpha, alpha) weights; needs data.sampling=balanced; exact on any "
               "number of ranks")
    Section = MixupConfig
    metrics = ("mix_weight",)
    needs_balanced_sampling = ("Mixup pairs sample k of each domain with sample k of the next, which needs "
                               "the same number of samples from every domain in each step")

    def __init__(self, settings: MixupConfig | None = None, context=None):
        super().__init__(settings, context)
        if not self.settings.alpha > 0:
            raise ConfigError(f"mixup.alpha={self.settings.alpha}: Beta(alpha, alpha) needs alpha > 0")

    @classmethod
    def sweep_space(cls, preset):
        return {"mixup.alpha": {"log_uniform": [0.1, 10.0]}}  # DomainBed: 10^U(-1, 1)

    def draws(self, step, steps_per_epoch, sample_ids):
        """The cyclic order of the domains (each manifest domain's place in it) and each domain's
        lambda for the pair it starts, from (seed, optimizer step): the micro-steps of one
        accumulated update mix with the same pairs and weights, as DomainBed's single update."""
        update = step // self.context.grad_accum
        rng = np.random.Generator(np.random.PCG64(mix_seed(self.context.seed, update, _DRAW_SALT)))
        cycle = rng.permutation(self.context.num_domains)
        weights = rng.beta(self.settings.alpha, self.settings.alpha, size=self.context.num_domains)
        place = np.empty_like(cycle)
        place[cycle] = np.arange(len(cycle))
        return {"cycle_place": tuple(int(p) for p in place), "mix_weights": tuple(float(w) for w in weights)}

    def transform_inputs(self, batch, draws):
        if batch.domains is None or batch.order is None:
            raise ValueError("Mixup needs each image's domain and place in the global batch")
        device = batch.images.device
        place = torch.tensor(draws["cycle_place"], dtype=torch.long).to(device, non_blocking=True)
        weights = torch.tensor(draws["mix_weights"], dtype=torch.float32).to(device, non_blocking=True)
        partner = paired_rows(batch.domains, batch.order, next_domain(place, batch.domains))
        weight = weights[batch.domains]
        mix = weight.to(batch.images.dtype)[:, None, None, None]
        images = mix * batch.images + (1 - mix) * batch.images.index_select(0, partner)
        return batch.replace(images=images, extras={**batch.extras, "partner_labels": batch.labels[partner],
                                                    "mix_weight": weight})

    def loss(self, logits, batch, extras):
        logits = logits.float()
        weight = batch.extras["mix_weight"]
        own = F.cross_entropy(logits, batch.labels, reduction="none")
        partner = F.cross_entropy(logits, batch.extras["partner_labels"], reduction="none")
        return (weight * own + (1 - weight) * partner).mean(), {"mix_weight": weight.mean()}


def next_domain(place: Tensor, domains: Tensor) -> Tensor:
    """(K,): for each domain, the next domain PRESENT in ``domains`` along the cyclic order given
    by ``place`` (each domain's place in it); a domain alone in the batch is its own partner
    (DomainBed then mixes a domain with itself). On the device, no host sync."""
    num_domains = place.shape[0]
    present = torch.zeros(num_domains, dtype=torch.bool, device=domains.device)
    present[domains] = True
    gap = (place[None, :] - place[:, None]) % num_domains  # gap[a, b]: steps from a to b along the cycle
    gap = gap.masked_fill(~present[None, :] | (gap == 0), num_domains)
    closest = gap.min(dim=1)
    return torch.where(closest.values < num_domains, closest.indices, torch.arange(num_domains, device=domains.device))


def paired_rows(domains: Tensor, order: Tensor, partner_domain: Tensor) -> Tensor:
    """(N,): the row holding each row's partner: the same position k among its domain's rows
    (ranked by their place in the global batch) in domain ``partner_domain[d]``.

    With balanced sampling every domain has as many rows in the batch and a rank holds the same
    positions k of each, so position k of the local rows is a position of the global batch
    too."""
    n = domains.shape[0]
    by_place = torch.argsort(order)
    by_domain = by_place[torch.sort(domains[by_place], stable=True).indices]  # rows by (domain, place)
    counts = torch.zeros_like(partner_domain).index_add(0, domains, torch.ones_like(domains))  # no host sync
    first = torch.cumsum(counts, 0) - counts  # where each domain's rows start in by_domain
    rank = torch.empty_like(by_domain)
    rank[by_domain] = torch.arange(n, device=domains.device)
    position = rank - first[domains]  # k: the row's position among its domain's rows
    return by_domain[first[partner_domain[domains]] + position]
