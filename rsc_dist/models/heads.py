"""Heads: the part of a backbone from its last feature map z to the logits (torchvision's
backbones; timm's are in rsc_dist.models.timm_backbones). Each knows ``in_channels``, the size
of its pooled features, and ``pooled(z)``, those features (what CORAL and a method's own
modules on the pooled features take).

A head that is global average pooling and one linear layer names that layer as
``closed_form_classifier``: RSC's saliency then has a closed form (rsc_dist.methods.rsc_masks);
the others are scored through autograd. These heads read NCHW maps, whose every location
reaches the logits (``rsc_dist.models.layouts``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class PooledLinearHead(nn.Module):
    """Global average pool + linear: ``h(z) = W . GAP(z) + b``.

    Its ``closed_form_classifier`` gives rsc_mask the saliency in closed form (Step 1):
    ``G[i, c, h, w] = W[y_i, c] / (H * W)``, so no backward pass is needed at all.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.in_channels = in_channels
        self.fc = nn.Linear(in_channels, num_classes)

    @property
    def closed_form_classifier(self) -> nn.Linear:
        return self.fc

    def pooled(self, z: Tensor) -> Tensor:
        return z.mean(dim=(2, 3))

    def forward(self, z: Tensor) -> Tensor:
        return self.fc(self.pooled(z))


class AlexNetHead(nn.Module):
    """AlexNet after pool5: adaptive pool to 6 x 6, flatten, the MLP classifier (non-linear)."""

    def __init__(self, classifier: nn.Sequential):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = classifier
        self.in_channels = classifier[1].in_features // 36  # its first linear layer reads 6 x 6 x C

    def pooled(self, z: Tensor) -> Tensor:
        """Global average pooling of z (C values): its MLP reads 6 x 6 x C."""
        return z.mean(dim=(2, 3))

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

    def pooled(self, z: Tensor) -> Tensor:
        """Global average pooling of z, before the LayerNorm (what CORAL has read since it was added)."""
        return z.mean(dim=(2, 3))

    def forward(self, z: Tensor) -> Tensor:
        return self.classifier(self.pool(z))
