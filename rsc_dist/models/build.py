"""``build_model``: a registered backbone, its pretrained weights loaded, as a ``Network``."""

from __future__ import annotations

import os

import torchvision

from rsc_dist.models.backbones import ARCHS, BACKBONES
from rsc_dist.models.network import Network
from rsc_dist.models.weights import load_imagenet_weights, load_run_weights, run_weights


def build_model(
    arch: str,
    num_classes: int,
    *,
    pretrained: str | os.PathLike | None = None,
    freeze_bn: bool = False,
) -> Network:
    """A registered torchvision backbone split into features and head (a method's own modules
    are added by the trainer as ``network.method``, after the backbone's initialization).

    ``pretrained``: None (random init), "torchvision" (the ImageNet weights file in the
    torchvision cache, never downloaded), a path to a state-dict file, or one of this project's
    runs (a run folder, best/, checkpoint_STEP/; models.weights.run_weights). The ImageNet
    classifier layer is always replaced by a fresh one with ``num_classes`` outputs; a run's
    head is kept when it has ``num_classes`` outputs.
    """
    if arch not in BACKBONES:
        raise ValueError(f"model.arch must be one of {ARCHS}; got {arch!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    net = getattr(torchvision.models, arch)(weights=None)
    from_run = run_weights(pretrained)
    if pretrained not in (None, "", "none") and from_run is None:
        load_imagenet_weights(net, arch, pretrained)
    features, head = BACKBONES[arch].split(net, num_classes)
    network = Network(features, head, freeze_bn=freeze_bn)
    if from_run is not None:
        network.loaded_from = load_run_weights(network, from_run, str(pretrained))
    return network


