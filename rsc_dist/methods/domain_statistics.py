"""Per-domain quantities of a step's GLOBAL batch, for the methods that compare source domains
(DomainBed's CORAL, MMD, GroupDRO, IRM, VREx): every rank computes the same value from what
all ranks hold, with a gradient that comes out exact under DDP's average
(rsc_dist.core.collectives says why).

- ``domain_risks``: each domain's mean cross-entropy over its samples of the whole step, and
  their counts (one all-reduce), and ``mean_over_present``: their mean over the domains present.
- ``gather_domain_rows`` / ``domain_membership``: every rank's per-sample features with their
  domains (one all-gather, padded rows belong to no domain), and the domains as one-hot rows.
- ``mean_over_domain_pairs``: a pairwise distance averaged over the pairs of present domains.
- ``index_within_domain``: each sample's position among its domain's samples of the step, in
  the global order (StepBatch.order), the same on any number of ranks.

A domain absent from the step (a target domain, or a source that merged sampling did not draw)
has count 0 and is weighted out, never branched on: no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rsc_dist.core.collectives import gather_rows
from rsc_dist.methods.global_batch import per_domain_means

_PADDING_DOMAIN = -1  # the domain of a padded row: matches no domain
_NO_PLACE = torch.iinfo(torch.int64).max  # the order of a padded row: after every real one


def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 when it is in a lower precision (bf16 under autocast), else as it is."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def full_precision(tensor: Tensor):
    """A context in which autocast is off on ``tensor``'s device: batch statistics (covariances,
    kernel distances) are computed in float32 even inside a bf16 forward, where a matmul would
    otherwise run in bf16 and its rounding would swamp the differences between domains."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def pooled_features(z: Tensor, head=None) -> Tensor:
    """(N, d): the pooled features of z (DomainBed's featurizer output). With ``head``: what its
    ``pooled`` gives (for a CNN the map averaged over its locations, for a timm model the vector
    its classifier reads, e.g. a ViT's class token after the final norm). Without: a feature map
    (N, C, H, W) averaged over its locations; (N, d) as it is."""
    if head is not None and hasattr(head, "pooled"):
        return head.pooled(z)
    return z.mean(dim=(2, 3)) if z.dim() == 4 else z.flatten(1)


def domain_risks(logits: Tensor, labels: Tensor, domains: Tensor, num_domains: int,
                 group=None) -> tuple[Tensor, Tensor]:
    """(risks (K,), counts (K,)): each domain's mean cross-entropy over its samples of the global
    batch (0 for a domain absent from the step) and how many there are; in at least float32."""
    if domains is None:
        raise ValueError("this method needs each training sample's domain (the batch has no 'domain')")
    per_sample = F.cross_entropy(at_least_float32(logits), labels, reduction="none")
    return per_domain_means(per_sample, domains, num_domains, group)


def mean_over_present(values: Tensor, counts: Tensor) -> Tensor:
    """The mean of ``values`` (K,) over the domains with ``counts`` > 0 (0 when none is)."""
    present = (counts > 0).to(values.dtype)
    return (values * present).sum() / present.sum().clamp(min=1)


def gather_domain_rows(features: Tensor, domains: Tensor, group=None, capacity: int | None = None
                       ) -> tuple[Tensor, Tensor]:
    """(features (M, d) in at least float32, domains (M,) as float): every rank's rows, rank by rank, each
    rank's padded to ``capacity`` rows of domain -1; with a gradient back to every rank's own
    rows. One all-gather for features and domains together; on one process, the input."""
    features = at_least_float32(features)
    domain_column = domains.to(features.dtype)
    if group is None:
        return features, domain_column
    rows = torch.cat([features, domain_column[:, None]], dim=1)
    padding = rows.new_zeros(rows.shape[1])
    padding[-1] = _PADDING_DOMAIN
    rows = gather_rows(rows, group, capacity, padding, differentiable=True)
    return rows[:, :-1], rows[:, -1]


def domain_membership(domain_column: Tensor, num_domains: int) -> Tensor:
    """(K, M): row k is 1 where a sample belongs to domain k (padded rows: nowhere)."""
    ids = torch.arange(num_domains, device=domain_column.device, dtype=domain_column.dtype)
    return (domain_column[None, :] == ids[:, None]).to(domain_column.dtype)


def mean_over_domain_pairs(distance, present: Tensor) -> Tensor:
    """1/|P| sum over the pairs P = {(a, b): a < b, both present} of ``distance(a, b)`` (a
    scalar tensor); ``present`` (K,) 0/1. No pair (one domain present): 0."""
    total = present.new_zeros(())
    pairs = present.new_zeros(())
    num_domains = present.shape[0]
    for a in range(num_domains):
        for b in range(a + 1, num_domains):
            weight = present[a] * present[b]
            total = total + weight * distance(a, b)
            pairs = pairs + weight
    return total / pairs.clamp(min=1)


def index_within_domain(order: Tensor, domains: Tensor, group=None, capacity: int | None = None) -> Tensor:
    """(N,) int64: each local sample's position among the samples of its domain in the step's
    global batch, counted in the global order (``order``, StepBatch.order). One all-gather of
    two integers per sample; the same answer on any number of ranks, for any split."""
    if order is None:
        raise ValueError("this method needs each image's place in the global batch (the batch has no 'order')")
    if domains is None:
        raise ValueError("this method needs each training sample's domain (the batch has no 'domain')")
    keys = torch.stack([order, domains.to(order.dtype)], dim=1)
    padding = torch.tensor([_NO_PLACE, _PADDING_DOMAIN], dtype=keys.dtype, device=keys.device)
    everyone = gather_rows(keys, group, capacity, padding)
    same_domain = everyone[None, :, 1] == keys[:, None, 1]
    earlier = everyone[None, :, 0] < keys[:, None, 0]
    return (same_domain & earlier).sum(dim=1)
