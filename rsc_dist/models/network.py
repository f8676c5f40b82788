"""The network of a run: a backbone's ``features`` and ``head``, and the modules of the run's
method (``method``: its own parameters and buffers, or None).

    logits = network(images)                                             # prediction: head(features(x))
    out = network(images, objective=method.objective, batch=batch, draws=draws)   # one training update
    z = network.featurize(batch)     # in an objective: features, then model.dropout (training only)

A training update runs the method's objective INSIDE this module's forward, so that under DDP
and DeepSpeed every module it uses (backbone, head, the method's own) takes part in the
wrapped forward: DDP's gradient hooks and ZeRO-3's parameter gathering see them. The method
itself is a plain object carried by the training loop; it is never part of the state dict,
while its modules are (``method.*`` keys). Prediction never runs the method's modules.
"""

from __future__ import annotations

from torch import Tensor, nn

from rsc_dist.models.feature_dropout import FeatureDropout, dropout_seeds
from rsc_dist.models.layouts import FeatureLayout, layout_of


class Network(nn.Module):
    def __init__(self, features: nn.Module, head: nn.Module, method: nn.Module | None = None, *,
                 freeze_bn: bool = False, dropout: float = 0.0):
        super().__init__()
        self.features = features
        self.head = head
        self.method = method
        self.freeze_bn = freeze_bn
        self.dropout = FeatureDropout(dropout)  # no parameters: the state dict is the same with or without
        self.loaded_from: str | None = None  # which of a run's weights it started from (models.build)
        self.train()  # a module starts in training mode; with freeze_bn its BatchNorm layers do not

    def featurize(self, batch) -> Tensor:
        """A training batch's features z (a methods.base.StepBatch: images, sample_ids, step):
        the backbone, then model.dropout as DomainBed's featurizer ends (rsc_dist.models.feature_dropout)."""
        z = self.features(batch.images)
        seeds = None
        if batch.sample_ids is not None and batch.step is not None:
            seeds = dropout_seeds(batch.sample_ids, batch.step)
        return self.dropout(z, seeds)

    @property
    def feature_dim(self) -> int:
        """The size of the pooled feature vector (``head.pooled(z)``; the channels of z for a CNN)."""
        return self.head.in_channels

    @property
    def feature_layout(self) -> FeatureLayout:
        """Where z keeps its channels and locations (rsc_dist.models.layouts)."""
        return layout_of(self.head)

    @property
    def locations_reach_logits(self) -> bool:
        """False for a head that reads none of z's locations (a ViT's class-token head on the
        last layer): muting locations could not change the logits."""
        return getattr(self.head, "locations_reach_logits", True)

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

    def forward(self, x: Tensor, objective=None, **inputs):
        """Logits (N, K); with ``objective``: ``objective(self, **inputs)``, a method's update."""
        if objective is None:
            return self.head(self.features(x))
        return objective(self, **inputs)
