"""Backbones split into ``features(x) -> z`` and ``head(z) -> logits``, and the model that joins
them with the run's method (rsc_dist.methods).

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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import Tensor, nn

from rsc_dist.methods.rsc_masks import PooledLinearHead

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


class AlexNetHead(nn.Module):
    """AlexNet after pool5: adaptive pool to 6 x 6, flatten, the MLP classifier (non-linear)."""

    def __init__(self, classifier: nn.Sequential):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = classifier

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

    def forward(self, z: Tensor) -> Tensor:
        return self.classifier(self.pool(z))


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
    # (rsc.PooledLinearHead, whose class-weight matrix gives the saliency with no backward).
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


def build_model(
    arch: str,
    num_classes: int,
    *,
    pretrained: str | os.PathLike | None = None,
    method=None,
    freeze_bn: bool = False,
) -> Network:
    """A registered torchvision backbone split into features and head, with ``method``
    (rsc_dist.methods; None: the plain network, as evaluation uses it).

    ``pretrained``: None (random init), "torchvision" (the ImageNet weights file in the
    torchvision cache, never downloaded), or a path to a state-dict file. The ImageNet
    classifier layer is always replaced by a fresh one with ``num_classes`` outputs.
    """
    if arch not in BACKBONES:
        raise ValueError(f"model.arch must be one of {ARCHS}; got {arch!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    net = getattr(torchvision.models, arch)(weights=None)
    if pretrained not in (None, "", "none"):
        load_imagenet_weights(net, arch, pretrained)
    features, head = BACKBONES[arch].split(net, num_classes)
    return Network(features, head, method, freeze_bn=freeze_bn)


def pretrained_path(arch: str, pretrained: str | os.PathLike) -> Path:
    """Where the weights for ``pretrained`` live: a given path, or the torchvision cache."""
    if str(pretrained) != "torchvision":
        return Path(pretrained).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONES[arch].weights_file()


def load_imagenet_weights(net: nn.Module, arch: str, pretrained: str | os.PathLike) -> None:
    path = pretrained_path(arch, pretrained)
    if not path.is_file():
        where = (
            f"the torchvision cache ({path}); copy the file there, or set TORCH_HOME, "
            "or pass --model.pretrained=/path/to/weights.pth"
            if str(pretrained) == "torchvision"
            else str(path)
        )
        raise FileNotFoundError(
            f"pretrained weights for {arch} not found in {where}. This tool never downloads "
            "weights at run time; use --model.pretrained=none for random initialization."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ValueError(f"cannot read pretrained weights from {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    classifier_prefix = BACKBONES[arch].classifier_prefix
    state = {k: v for k, v in state.items() if not k.startswith(classifier_prefix)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier_prefix)]
    if missing or unexpected:
        raise ValueError(
            f"pretrained weights in {path} do not fit {arch}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
