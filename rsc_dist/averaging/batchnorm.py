"""BatchNorm statistics of an averaged model, recomputed over the GLOBAL batch of every rank.

Averaging weights does not average what BatchNorm's running statistics describe: the
activations of the averaged network are not those of any network whose statistics were
recorded. SWA and SWAD therefore recompute them on training data (torch's
``swa_utils.update_bn``, the SWAD authors' ``update_bn``): each BatchNorm layer normalizes
with the statistics of the batch, and its running statistics become the mean over the batches
of each batch's mean and unbiased variance (momentum None).

Here each batch is the step's global batch, whatever the number of ranks: every BatchNorm
layer normalizes with, and records, the mean and variance of its input over all ranks' shares
(one all-reduce of per-channel sums per layer and batch, summed in float64), so N ranks
compute what one process computes on the concatenated batch. The rest of the network runs in
eval mode (no dropout or stochastic depth: the statistics describe the network that predicts).
With frozen BatchNorm (``model.freeze_bn``, DomainBed's and SWAD's default) the statistics are
never updated while training and nothing is recomputed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def batchnorm_layers(network: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class _GlobalStatistics:
    """One layer's replacement forward: normalize with the global batch's statistics, sum them."""

    def __init__(self, layer, group):
        self.layer, self.group = layer, group
        channels = layer.num_features
        device = layer.running_mean.device
        self.mean_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.var_sum = torch.zeros(channels, dtype=torch.float64, device=device)
        self.batches = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        dims = [0, *range(2, x.dim())]
        wide = x.double()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        sums = torch.cat([wide.sum(dims), (wide * wide).sum(dims), count])
        if self.group is not None:
            dist.all_reduce(sums, group=self.group)
        channels = x.shape[1]
        n = sums[-1]
        mean = sums[:channels] / n
        var = (sums[channels:2 * channels] / n - mean * mean).clamp(min=0)  # biased: what normalizes
        self.mean_sum += mean
        self.var_sum += torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)  # unbiased, as torch records
        self.batches += 1
        out = F.batch_norm(x.float(), mean.float(), var.float(), layer.weight, layer.bias, False, 0.0, layer.eps)
        return out.to(x.dtype)

    def store(self) -> None:
        layer = self.layer
        layer.running_mean.copy_(self.mean_sum / self.batches)
        layer.running_var.copy_(self.var_sum / self.batches)
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.fill_(self.batches)


@torch.no_grad()
def recompute_batchnorm(network: nn.Module, batches, group=None, autocast=contextlib.nullcontext) -> int:
    """Replace the running statistics of every BatchNorm layer of ``network`` with those of
    ``batches`` (this rank's share of each global batch; ``group``: the ranks, None on one
    process; ``autocast``: makes the context each forward runs in). Every rank must pass as
    many batches. Returns the number of batches used (0: the network has no BatchNorm layer,
    or no batch came)."""
    layers = batchnorm_layers(network)
    if not layers:
        return 0
    hooks = {layer: _GlobalStatistics(layer, group) for layer in layers}
    was_training = network.training
    network.eval()
    count = 0
    try:
        for layer, hook in hooks.items():
            layer.forward = hook  # an instance attribute shadows the class's forward
        for images in batches:
            with autocast():
                network(images)
            count += 1
    finally:
        for layer in layers:
            del layer.forward
        network.train(was_training)
    if count:
        for hook in hooks.values():
            hook.store()
    return count
