"""Heads: the part of a backbone from its last feature map z to the logits. Each knows
``in_channels``, the channels of z (what a method's own modules on the pooled features take).

``PooledLinearHead`` (global average pool + one linear layer) is what RSC's closed-form saliency
recognizes (rsc_dist.methods.rsc_masks); the others are scored through autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PooledLinearHead(nn.Module):
    """Global average pool + linear: ``h(z) = W . GAP(z) + b``.

    rsc_mask recognizes this class and computes saliency in closed form (Step 1):
    ``G[i, c, h, w] = W[y_i, c] / (H * W)``, so no backward pass is needed at all.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.in_channels = in_channels
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc(z.mean(dim=(2, 3)))


class AlexNetHead(nn.Module):
    """AlexNet after pool5: adaptive pool to 6 x 6, flatten, the MLP classifier (non-linear)."""

    def __init__(self, classifier: nn.Sequential):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = classifier
        self.in_channels = classifier[1].in_features // 36  # its first linear layer reads 6 x 6 x C

    def forward(self, z: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(z), 1))


class PooledNormHead(nn.Module):
    """ConvNeXt after its last stage: global average pool, LayerNorm over channels, flatten,
    linear. The LayerNorm after the pool makes the logits non-linear in z: RSC's saliency then
    goes through autograd (correct, a little slower than the closed form)."""

    def __init__(self, pool: nn.Module, classifier: nn.Sequential):
        super().__init__()
        self.pool = pool
        self.classifier = classifier
        self.in_channels = classifier[-1].in_features

    def forward(self, z: Tensor) -> Tensor:
        return self.classifier(self.pool(z))
