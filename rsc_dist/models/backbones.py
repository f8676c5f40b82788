"""The backbone registry: each torchvision network split into ``features(x) -> z`` (up to the
last feature map, where RSC acts) and ``head(z) -> logits``, with what offline weight loading
needs (docs/extending.md, "Adding a backbone"); beside them any timm model by name,
``timm/<model name>`` (rsc_dist.models.timm_backbones). ``check_arch`` says which names a
config may use.

The seven torchvision names stay torchvision networks: timm has no AlexNet, its ConvNeXt-Tiny
is another implementation with another weights file, and the ResNets' state-dict keys would
change (runs' checkpoints must keep loading). timm's ``resnet*.tv_in1k`` are the same networks
with the same weights files, with outputs equal to these (tests/test_timm_backbones.py).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Callable

import torchvision
from torch import nn

from rsc_dist.core.errors import ConfigError
from rsc_dist.models.heads import AlexNetHead, PooledLinearHead, PooledNormHead
from rsc_dist.models.timm_backbones import TIMM_PREFIX, check_timm_name, preprocessing, timm_model_name


def _split_resnet(net: nn.Module, num_classes: int) -> tuple[nn.Module, nn.Module]:
    features = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    return features, PooledLinearHead(net.fc.in_features, num_classes)


def _split_alexnet(net: nn.Module, num_classes: int) -> tuple[nn.Module, nn.Module]:
    net.classifier[6] = nn.Linear(net.classifier[6].in_features, num_classes)
    return net.features, AlexNetHead(net.classifier)


def _split_convnext(net: nn.Module, num_classes: int) -> tuple[nn.Module, nn.Module]:
    net.classifier[2] = nn.Linear(net.classifier[2].in_features, num_classes)
    return net.features, PooledNormHead(net.avgpool, net.classifier)


@dataclass(frozen=True)
class Backbone:
    """A registered torchvision backbone: how it splits into ``features`` (up to the last
    feature map z, where RSC acts) and ``head`` (z to logits), and what offline loading needs."""

    name: str  # the torchvision constructor and model.arch's value
    weights: str  # the torchvision weights enum: its DEFAULT file is what "torchvision" loads
    classifier_prefix: str  # state-dict prefix of the ImageNet classifier, replaced for the task
    split: Callable[[nn.Module, int], tuple[nn.Module, nn.Module]]
    # What RSC's closed form needs: a head that is global average pooling and one linear layer
    # (models.heads.PooledLinearHead, whose class-weight matrix gives the saliency with no backward).
    # Other heads are scored through autograd.
    pooled_linear_head: bool

    def weights_file(self) -> str:
        """The file name of the ImageNet weights in the torchvision cache (TORCH_HOME/hub/checkpoints)."""
        return os.path.basename(getattr(torchvision.models, self.weights).DEFAULT.url)


# The registry: one line per backbone. A new torchvision CNN with a GAP + linear head reuses
# _split_resnet's pattern and gets RSC's closed form (docs/extending.md).
BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("resnet18", "ResNet18_Weights", "fc.", _split_resnet, True),
    Backbone("resnet34", "ResNet34_Weights", "fc.", _split_resnet, True),
    Backbone("resnet50", "ResNet50_Weights", "fc.", _split_resnet, True),
    Backbone("resnet101", "ResNet101_Weights", "fc.", _split_resnet, True),
    Backbone("wide_resnet50_2", "Wide_ResNet50_2_Weights", "fc.", _split_resnet, True),
    Backbone("alexnet", "AlexNet_Weights", "classifier.6.", _split_alexnet, False),
    Backbone("convnext_tiny", "ConvNeXt_Tiny_Weights", "classifier.2.", _split_convnext, False),
)}
ARCHS = tuple(BACKBONES)


def check_arch(arch: str) -> None:
    """ConfigError (one line) unless ``arch`` is a registered torchvision backbone or a model timm has."""
    name = timm_model_name(arch)
    if name is not None:
        check_timm_name(name)
        return
    if arch not in BACKBONES:
        close = difflib.get_close_matches(arch, ARCHS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"model.arch must be one of {', '.join(ARCHS)} or {TIMM_PREFIX}<timm model name> "
                          f"(e.g. timm/resnet50.ram_in1k); got {arch!r}{hint}")


def backbone_preprocessing(arch: str) -> dict:
    """The input a backbone's weights expect (``data.mean``, ``data.std``, ``data.image_size``):
    a timm model's own pretrained config; {} for torchvision's (the config's defaults are theirs)."""
    check_arch(arch)
    name = timm_model_name(arch)
    return preprocessing(name) if name is not None else {}
