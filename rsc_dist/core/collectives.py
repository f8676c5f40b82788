"""The collectives a method needs to compute over the GLOBAL batch of a step, in one place.

Every rank of a data-parallel step computes the same global quantity (RSC's batch threshold,
CORAL's and MMD's per-domain statistics, GroupDRO's per-domain losses, ...) from what all ranks
hold. Two shapes cover every method:

- ``gather_rows``: every rank's rows, rank by rank, each rank padded to a fixed ``capacity``
  (the largest local batch of any rank), so the collective needs no size agreement (no host
  sync). Padding rows hold ``padding`` (a value that matches no real row, e.g. a domain of -1).
- ``all_reduce_sum``: the sum over ranks.

Both take ``differentiable=True`` when the global quantity is part of the loss. The rule that
makes the step exact: every rank computes the SAME loss from the collected values, so the
gradient that reaches a rank's own rows is the SUM over ranks of each rank's gradient with
respect to them (one all-reduce in the backward): R times the single-process gradient, which
DDP's (and DeepSpeed's) average over R ranks turns back into exactly the single-process
gradient. ``group`` None means one process: the functions return their input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group=group)


def rank(group) -> int:
    return 0 if group is None else dist.get_rank(group=group)


def gather_rows(rows: Tensor, group, capacity: int | None = None, padding: float | Tensor = 0.0, *,
                differentiable: bool = False) -> Tensor:
    """(world x capacity, ...): every rank's rows in rank order, each rank's padded to ``capacity``
    rows filled with ``padding`` (a number, or one row). ``capacity`` None: this rank's row count (all ranks must then
    hold as many rows). One all-gather; with ``differentiable`` one all-reduce in the backward."""
    if group is None:
        return rows
    n = rows.shape[0]
    capacity = n if capacity is None else capacity
    if n > capacity:
        raise ValueError(f"local batch of {n} rows exceeds the gather capacity {capacity}")
    if differentiable and rows.requires_grad:
        return _GatherRows.apply(rows, group, capacity, padding)
    return _gather(rows.detach() if differentiable else rows, group, capacity, padding)


def _gather(rows: Tensor, group, capacity: int, padding) -> Tensor:
    n = rows.shape[0]
    padded = rows.new_empty((capacity, *rows.shape[1:]))
    padded[n:] = padding
    padded[:n] = rows
    gathered = rows.new_empty((dist.get_world_size(group=group) * capacity, *rows.shape[1:]))
    dist.all_gather_single(gathered, padded, group=group)
    return gathered


class _GatherRows(torch.autograd.Function):
    """``_gather`` with a gradient: the sum over ranks of the gradient of this rank's rows."""

    @staticmethod
    def forward(ctx, rows, group, capacity, padding):
        ctx.group, ctx.n, ctx.capacity = group, rows.shape[0], capacity
        ctx.rank = dist.get_rank(group=group)
        return _gather(rows, group, capacity, padding)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = ctx.rank * ctx.capacity
        return grad[start:start + ctx.n], None, None, None


def all_reduce_sum(tensor: Tensor, group, *, differentiable: bool = False) -> Tensor:
    """The sum over the ranks of ``group`` (a new tensor; the input is left as it is)."""
    if group is None:
        return tensor
    if differentiable and tensor.requires_grad:
        return _AllReduceSum.apply(tensor, group)
    total = tensor.detach().clone()
    dist.all_reduce(total, group=group)
    return total


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the upstream gradients (every rank
    computes the same loss from the sum, see the module docstring)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
