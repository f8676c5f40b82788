"""CORAL: Deep CORAL (Sun & Saenko, ECCV-W 2016) as DomainBed uses it for domain generalization.

The loss (DomainBed's ``CORAL`` with its ``coral`` distance, ``mmd_gamma`` = penalty_weight):

    loss = CE(logits, y) + gamma * 1/|P| * sum_{(a, b) in P} [ mean_j (mu_a - mu_b)_j^2
                                                            + mean_jk (C_a - C_b)_jk^2 ]

over the pairs P of source domains present in the step's batch, where for domain a with n_a
samples of pooled features f_i (d values: the backbone's output after global average pooling,
for a CNN; the vector a timm model's classifier reads, for any timm backbone, ViTs included):

    mu_a = 1/n_a sum_i f_i                                   (Sun & Saenko, Eq. 1: the means)
    C_a  = 1/(n_a - 1) sum_i (f_i - mu_a)(f_i - mu_a)^T       (Eq. 2: the covariances)

(Sun & Saenko's Eq. 1 divides the squared Frobenius distance by 4 d^2; DomainBed takes the mean
over the d x d entries and adds the mean squared difference of the means; we follow DomainBed.)

EXACT under data parallelism: mu_a and C_a are computed over the GLOBAL batch of all ranks,
never per rank (docs/method.md, "CORAL over the global batch" says what per-rank statistics
would compute instead). Every rank all-gathers the pooled features of all ranks (one
collective), computes the same penalty, and the gradient flows back through the gather to
every rank's own rows (rsc_dist.core.collectives.gather_rows, differentiable). The cross-entropy is the mean over the local batch,
as for ERM; DDP's (and DeepSpeed's) gradient averaging then makes the step the single-process
step on the global batch.

Domains with fewer than 2 samples in the global batch have no covariance and take part in no
pair (with ``data.sampling=balanced`` every source domain has batch_size samples per rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from rsc_dist.core.fields import setting
from rsc_dist.methods.base import Method
from rsc_dist.methods.domain_statistics import (
    domain_membership,
    full_precision,
    gather_domain_rows,
    mean_over_domain_pairs,
    pooled_features,
)


@dataclass(frozen=True)
class CORALConfig:
    penalty_weight: float = setting(
        1.0, "weight of the CORAL penalty (mean and covariance distance between source domains; "
        "DomainBed's mmd_gamma)", check="nonnegative")


class CORAL(Method):
    name = "coral"
    summary = "Deep CORAL: cross-entropy plus the distance between source domains' feature means and covariances"
    Section = CORALConfig
    metrics = ("coral_penalty",)

    @classmethod
    def sweep_space(cls, preset):
        return {"coral.penalty_weight": {"log_uniform": [0.1, 10.0]}}  # DomainBed: 10^U(-1, 1)

    def __init__(self, settings: CORALConfig | None = None, context=None):
        super().__init__(settings, context)
        if self.context.num_domains < 1:
            raise ValueError("CORAL needs the number of domains of the dataset (context.num_domains)")

    def transform_features(self, z, head, batch, draws):
        return z, {"pooled": pooled_features(z, head)}

    def loss(self, logits, batch, extras):
        if batch.domains is None:
            raise ValueError("CORAL needs each training sample's domain (the batch has no 'domain')")
        cross_entropy = F.cross_entropy(logits.float(), batch.labels)
        penalty = coral_penalty(extras["pooled"], batch.domains, self.context.num_domains,
                                process_group=self.process_group, capacity=self.context.capacity)
        return cross_entropy + self.settings.penalty_weight * penalty, {"coral_penalty": penalty.detach()}


def coral_penalty(features: Tensor, domains: Tensor, num_domains: int, *, process_group=None,
                  capacity: int | None = None) -> Tensor:
    """The mean CORAL distance over pairs of domains present (>= 2 samples) in the batch.

    ``features`` (N, d) with gradient, ``domains`` (N,) integer indices in [0, num_domains).
    With ``process_group`` the statistics are over the rows of every rank in the group (each
    rank pads to ``capacity`` rows, the largest local batch, so the gather needs no size
    agreement). No host sync: absent domains are weighted out, not branched on.
    """
    with full_precision(features):
        features, domain_column = gather_domain_rows(features, domains, process_group, capacity)
        member = domain_membership(domain_column, num_domains)  # (K, N) one-hot
        counts = member.sum(dim=1)
        means = member @ features / counts.clamp(min=1)[:, None]  # Eq. 1
        covariances = []
        for k in range(num_domains):
            centered = (features - means[k]) * member[k][:, None]  # rows of other domains: zero
            covariances.append(centered.T @ centered / (counts[k] - 1).clamp(min=1))  # Eq. 2
        present = (counts >= 2).to(features.dtype)
        return mean_over_domain_pairs(
            lambda a, b: (means[a] - means[b]).pow(2).mean() + (covariances[a] - covariances[b]).pow(2).mean(),
            present)
