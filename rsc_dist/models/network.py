"""The network of a run: a backbone's ``features`` and ``head``, with the method (if any) applied
between them in training (rsc_dist.methods).

``Network.forward(x, y, **draws)`` lets the method act on z between backbone and head when the
module is training and labels are given; it is one forward with one backward per step, so DDP,
DeepSpeed and gradient accumulation need nothing special. Per-step choices (RSC's
spatial/channel draw, p_batch) are forward arguments, never module state, so a resumed run
repeats them exactly.

    model = build_model("resnet18", num_classes=7, pretrained="torchvision", method=RSC())
    logits = model(images, labels, mode="spatial", p_batch=1/3)         # training step
    logits, extras = model(images, labels, return_extras=True, **draws)  # extras["mask"]: RSC's
    logits = model(images)                                                # evaluation: no method
"""

from __future__ import annotations

from torch import Tensor, nn


class Network(nn.Module):
    """A backbone's ``features`` and ``head``, with the method (if any) applied between them
    in training. The method is a plain object (no parameters, no state), never in the state dict."""

    def __init__(self, features: nn.Module, head: nn.Module, method=None, *, freeze_bn: bool = False):
        super().__init__()
        self.features = features
        self.head = head
        self.method = method
        self.freeze_bn = freeze_bn
        self.train()  # a module starts in training mode; with freeze_bn its BatchNorm layers do not

    def train(self, mode: bool = True) -> "Network":
        """``freeze_bn``: BatchNorm layers stay in eval mode (running statistics, never updated)
        while the rest trains, as DomainBed fine-tunes; each sample's forward then depends on
        no other sample, so the step does not depend on how the batch is split over ranks."""
        super().train(mode)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: Tensor, y: Tensor | None = None, *, return_extras: bool = False, **draws):
        """Logits (N, K). With ``return_extras=True``: (logits, the method's extras dict)."""
        z = self.features(x)
        extras = {}
        if self.training and y is not None and self.method is not None:
            z, extras = self.method.transform_features(z, self.head, y, **draws)
        logits = self.head(z)
        return (logits, extras) if return_extras else logits
