"""DomainBed's ResNet dropout (its ``resnet_dropout`` hyperparameter, model.dropout here),
with masks that depend on the samples, not on the ranks.

DomainBed's ResNet featurizer ends with ``nn.Dropout(p)`` on the pooled feature vector
(networks.ResNet.forward: ``dropout(network(x))``), before the classifier; RSC's gradient and
masks then act on the dropped-out features. Dropping unit c of the pooled vector of sample i
is dropping channel c of its feature map z before the pooling (pooling is linear):

    GAP(z * d / (1 - p)) = d * GAP(z) / (1 - p),   d[i, c] ~ Bernoulli(1 - p)

so this module scales whole channels of z, and the head (global average pooling + linear)
sees exactly DomainBed's dropped-out vector. d[i, c] is a hash of the sample's identity in the
global order and the step (rsc_dist.core.seeding.hashed_uniform), never of a generator's state
or of the rank: 2 ranks draw the masks 1 process draws, and a resumed run the masks of an
uninterrupted one. Evaluation never drops. With RSC the closed-form saliency stays exact: it is
the head's gradient with respect to its input, the dropped-out z, as DomainBed's autograd.grad
with respect to its dropped-out features.
"""

from __future__ import annotations

from torch import Tensor, nn

from rsc_dist.core.seeding import hashed_uniform, mix_seed

_STREAM = 0x44524F50  # "DROP": keeps these draws apart from every other use of the sample ids


def dropout_seeds(sample_ids: Tensor, step: int) -> Tensor:
    """Per-sample seeds of one step's masks: the samples' identities mixed with the step."""
    return sample_ids ^ mix_seed(_STREAM, step)


class FeatureDropout(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1); got {p}")
        self.p = p

    def forward(self, z: Tensor, seeds: Tensor | None = None) -> Tensor:
        """``z`` (N, C, ...) with each sample's channels kept with probability 1 - p and scaled
        by 1 / (1 - p); unchanged in eval mode or with p = 0. ``seeds`` (N,) int64: the
        samples' seeds for this step (``dropout_seeds``), required when it drops."""
        if not self.training or self.p == 0.0:
            return z
        if seeds is None:
            raise ValueError("model.dropout draws its masks from the samples' identities: this forward has none "
                             "(a method's objective must take its features from network.featurize(batch))")
        scale = channel_keep_mask(seeds, z.shape[1], self.p).to(z.dtype) / (1.0 - self.p)
        return z * scale.reshape(*scale.shape, *([1] * (z.dim() - 2)))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def channel_keep_mask(seeds: Tensor, channels: int, p: float) -> Tensor:
    """(N, C) bool: which channels of each sample ``FeatureDropout`` keeps for ``seeds``."""
    return hashed_uniform(seeds, channels) >= p
