"""``build_model``: a registered backbone (torchvision's, or any timm model), its pretrained
weights loaded, as a ``Network``."""

from __future__ import annotations

import os

import torchvision

from rsc_dist.core.errors import ConfigError
from rsc_dist.models.backbones import BACKBONES, check_arch
from rsc_dist.models.network import Network
from rsc_dist.models.timm_backbones import build_timm_backbone, timm_model_name
from rsc_dist.models.weights import load_imagenet_weights, load_run_weights, run_weights


def build_model(
    arch: str,
    num_classes: int,
    *,
    pretrained: str | os.PathLike | None = None,
    freeze_bn: bool = False,
    dropout: float = 0.0,
    image_size: int | None = None,
    head_blocks: int | None = None,
) -> Network:
    """A backbone split into features and head (a method's own modules are added by the trainer
    as ``network.method``, after the backbone's initialization).

    ``arch``: a torchvision name of rsc_dist.models.BACKBONES or ``timm/<model name>``.
    ``pretrained``: None (random init); for torchvision backbones "torchvision" (the ImageNet
    weights file in the torchvision cache), for timm ones "timm" (timm's / Hugging Face's
    cache), never downloaded; a path to a weights file; or one of this project's runs (a run
    folder, best/, checkpoint_STEP/; models.weights.run_weights): the pre-train -> fine-tune
    recipe. The ImageNet classifier layer is always replaced by a fresh one with
    ``num_classes`` outputs; a run's head is kept when it has ``num_classes`` outputs. ``image_size``: the input side,
    for timm models built for a fixed size (ViTs). ``head_blocks``: timm ViTs only
    (rsc_dist.models.timm_backbones).
    ``dropout``: DomainBed's ResNet dropout on the pooled features in training (FeatureDropout;
    torchvision backbones whose head is average pooling and one linear layer).
    """
    check_arch(arch)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    from_run = run_weights(pretrained)
    name = timm_model_name(arch)
    if name is not None:
        features, head = build_timm_backbone(name, num_classes, image_size=image_size,
                                             pretrained=None if from_run is not None else pretrained,
                                             head_blocks=head_blocks)
        if dropout:
            raise ConfigError(f"model.dropout is DomainBed's ResNet dropout on pooled CNN features; {arch} is a timm "
                              "model (its own drop rates are off: they would draw per rank)")
        network = Network(features, head, freeze_bn=freeze_bn)
        if from_run is not None:
            network.loaded_from = load_run_weights(network, from_run, str(pretrained))
        return network
    if head_blocks:
        raise ConfigError(f"model.head_blocks={head_blocks} applies to timm ViTs; {arch} is a torchvision CNN")
    net = getattr(torchvision.models, arch)(weights=None)
    if pretrained not in (None, "", "none") and from_run is None:
        load_imagenet_weights(net, arch, pretrained)
    features, head = BACKBONES[arch].split(net, num_classes)
    network = Network(features, head, freeze_bn=freeze_bn, dropout=dropout)
    if from_run is not None:
        network.loaded_from = load_run_weights(network, from_run, str(pretrained))
    return network
