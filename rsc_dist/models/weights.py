"""Pretrained weights of the torchvision backbones from local files only: the torchvision cache
or a given path, never a download (timm backbones: rsc_dist.models.timm_weights)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rsc_dist.core.errors import ConfigError
from rsc_dist.models.backbones import BACKBONES


def pretrained_path(arch: str, pretrained: str | os.PathLike) -> Path:
    """Where the weights for ``pretrained`` live: a given path, or the torchvision cache."""
    if str(pretrained) != "torchvision":
        return Path(pretrained).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONES[arch].weights_file()


def load_imagenet_weights(net: nn.Module, arch: str, pretrained: str | os.PathLike) -> None:
    if str(pretrained) == "timm":
        raise ConfigError(f"model.pretrained=timm is for timm backbones (model.arch=timm/...); for {arch} use "
                          "--model.pretrained=torchvision (the torchvision cache) or a weights file")
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
        raise ConfigError(f"cannot read pretrained weights from {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    classifier_prefix = BACKBONES[arch].classifier_prefix
    state = {k: v for k, v in state.items() if not k.startswith(classifier_prefix)}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of another shape: another architecture's file
        raise ConfigError(f"pretrained weights in {path} do not fit {arch}: "
                          f"{str(exc).splitlines()[-1].strip()}") from exc
    missing = [k for k in missing if not k.startswith(classifier_prefix)]
    if missing or unexpected:
        raise ConfigError(
            f"pretrained weights in {path} do not fit {arch}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
