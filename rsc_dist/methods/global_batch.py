"""The step's GLOBAL batch as every rank sees it: what methods defined over the whole batch of a
step (per-domain losses and statistics, pairs or partners across the batch) compute from.

Two tools, both exact on any number of ranks (rsc_dist.core.collectives says why the
gradients come out right):

- ``per_domain_means``: the mean of a per-sample value over each domain's samples of the whole
  step (all ranks), with the counts, in one all-reduce.
- ``in_global_order``: every rank's rows of the step in the global order (StepBatch.order:
  sampling group, then position in the group's share, mirror copies last), the same tensor on
  every rank and equal to what one process holds; one all-gather.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rsc_dist.core.collectives import all_reduce_sum, gather_rows

_NO_PLACE = torch.iinfo(torch.int64).max  # the order key of a padding row: sorts last


def per_domain_means(values: Tensor, domains: Tensor, num_domains: int, group=None, *,
                     differentiable: bool = True) -> tuple[Tensor, Tensor]:
    """(means (K,), counts (K,)): the mean of ``values`` (N,) over each domain's samples of the
    global batch, and how many there are (a domain absent from the step: mean 0, count 0)."""
    values = values.to(torch.promote_types(values.dtype, torch.float32))  # bf16 up, float64 kept
    sums = values.new_zeros(num_domains).index_add(0, domains, values)
    counts = values.new_zeros(num_domains).index_add(0, domains, torch.ones_like(values))
    totals = all_reduce_sum(torch.cat([sums, counts]), group, differentiable=differentiable)
    sums, counts = totals[:num_domains], totals[num_domains:]
    return sums / counts.clamp(min=1), counts.detach()


def in_global_order(rows: Tensor, order: Tensor, group=None, *, differentiable: bool = False) -> Tensor:
    """All ranks' ``rows`` (N, ...) of this step, sorted by their place in the global batch
    (``order``, StepBatch.order). Every rank holds as many rows in a training step (the global
    batch divides evenly), so no padding row takes part."""
    if order is None:
        raise ValueError("this method needs each image's place in the global batch (the batch has no 'order')")
    gathered = gather_rows(rows, group, differentiable=differentiable)
    keys = gather_rows(order, group)
    return gathered[torch.argsort(keys)]


def local_rows(order: Tensor, group=None) -> Tensor:
    """Where this rank's rows sit in the globally ordered tensor of ``in_global_order`` (N,)."""
    keys = gather_rows(order, group)
    return torch.searchsorted(torch.sort(keys).values, order)
