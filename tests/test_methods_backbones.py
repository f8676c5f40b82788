"""Every registered backbone (rsc_dist.models.BACKBONES): it splits into features and head, RSC
runs on it (the closed form exactly where the head is GAP + linear, and equal to autograd
there), and its ImageNet weights load offline with the classifier replaced."""

import os

import pytest
import torch
import torchvision
from torch import nn

from rsc_dist.methods import RSC
from rsc_dist.methods.base import StepBatch
from rsc_dist.methods.rsc_masks import _autograd_saliency, saliency
from rsc_dist.models.backbones import BACKBONES
from rsc_dist.models.build import build_model
from rsc_dist.models.heads import PooledLinearHead
from rsc_dist.models.weights import pretrained_path

CLASSES = 5


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_backbone_splits_and_rsc_runs_on_it(arch):
    torch.manual_seed(0)
    model = build_model(arch, CLASSES)
    for module in model.modules():  # frozen statistics: the logits then depend on each sample only
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    z = model.features(x)
    assert z.dim() == 4, "features end at a feature map, where RSC mutes locations and channels"
    assert model.head(z).shape == (2, CLASSES)
    assert isinstance(model.head, PooledLinearHead) == BACKBONES[arch].pooled_linear_head
    if BACKBONES[arch].pooled_linear_head:  # the closed form is the autograd saliency
        torch.testing.assert_close(saliency(z, model.head, y), _autograd_saliency(z, model.head, y))
    rsc = RSC()
    for mode in ("spatial", "channel"):
        out = model(x, objective=rsc.objective, batch=StepBatch(images=x, labels=y, pixels=x),
                    draws={"mode": mode, "p_batch": 1.0})
        logits, mask = out.logits, out.mask
        assert logits.shape == (2, CLASSES) and torch.isfinite(logits).all(), mode
        assert mask.shape[0] == 2 and bool(((mask == 0) | (mask == 1)).all()), mode


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_weights_file_is_torchvisions(arch):
    enum = getattr(torchvision.models, BACKBONES[arch].weights)
    assert pretrained_path(arch, "torchvision").name == os.path.basename(enum.DEFAULT.url)


@pytest.mark.parametrize("arch", ["resnet18", "convnext_tiny"])
def test_imagenet_weights_load_with_the_classifier_replaced(tmp_path, arch):
    torch.manual_seed(1)
    imagenet = getattr(torchvision.models, arch)(weights=None)
    path = tmp_path / "weights.pth"
    torch.save(imagenet.state_dict(), path)
    model = build_model(arch, CLASSES, pretrained=str(path))
    loaded = dict(model.features.named_parameters())
    for name, value in imagenet.state_dict().items():
        if name.startswith("features.") and name.removeprefix("features.") in loaded:
            assert torch.equal(loaded[name.removeprefix("features.")], value), name
    head_out = next(m for m in reversed(list(model.head.modules())) if isinstance(m, nn.Linear))
    assert head_out.out_features == CLASSES
    if arch == "convnext_tiny":  # its pretrained LayerNorm after the pool is kept
        assert torch.equal(model.head.classifier[0].weight, imagenet.classifier[0].weight)
