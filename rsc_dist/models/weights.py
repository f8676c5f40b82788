"""Pretrained weights from local files only, never a download: the torchvision cache, a given
torchvision-layout file, or this project's own run (its best/ or a checkpoint_STEP/, DeepSpeed's
included): the pre-train -> fine-tune recipe (timm backbones' own files: rsc_dist.models.timm_weights)."""

from __future__ import annotations

import hashlib
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


# ---------------------------------------------------------------------------------------------
# This project's own weights: a run's best/ or checkpoint_STEP/ (the pre-train -> fine-tune recipe)

RUN_LAYOUT = ("features.", "head.")  # the state-dict prefixes of a Network (rsc_dist.models.network)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def run_weights_location(path: str | os.PathLike) -> Path | None:
    """The weights inside a folder of this project: a run folder (its checkpoints/best), a
    best/ or best_averaged/ folder, a checkpoint_STEP/ folder (model.safetensors,
    pytorch_model.bin, or DeepSpeed's pytorch_model/ folder). None when ``path`` is not a folder."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    if (folder / "checkpoints" / "best").is_dir() and not (folder / "model.safetensors").exists():
        folder = folder / "checkpoints" / "best"  # a run folder: the weights its selection chose
    for name in ("model.safetensors", "pytorch_model.bin", "pytorch_model"):
        if (folder / name).exists():
            return folder / name
    raise ConfigError(f"model.pretrained={path}: no weights in this folder (model.safetensors, "
                      "pytorch_model.bin or DeepSpeed's pytorch_model/); give a run folder, its "
                      "checkpoints/best or a checkpoints/checkpoint_STEP folder")


def read_state(path: Path) -> dict:
    """A state dict from a safetensors file, a torch file, or a DeepSpeed checkpoint's
    pytorch_model/ folder (consolidated to whole fp32 weights, any ZeRO stage)."""
    path = Path(path)
    try:
        if path.is_dir():  # DeepSpeed: Accelerate's checkpoint_STEP/pytorch_model/
            try:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            except ImportError:
                raise ConfigError(f"model.pretrained: {path.parent} is a DeepSpeed checkpoint; reading it needs "
                                  "deepspeed (bash launch/venv.sh installs it)") from None
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name))
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except ConfigError:
        raise
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ConfigError(f"model.pretrained: cannot read weights from {path}: "
                          f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"model.pretrained: {path} does not hold a state dict")
    return state


def run_weights(pretrained: str | os.PathLike | None) -> dict | None:
    """The state dict (Network layout: features.*, head.*) when ``pretrained`` names this
    project's weights (a folder above, or a weights file with that layout); None otherwise
    (None, "torchvision", a torchvision-layout file: load_imagenet_weights reads those)."""
    if pretrained in (None, "", "none", "torchvision"):
        return None
    path = Path(pretrained).expanduser()
    location = run_weights_location(path)
    if location is None:
        if not path.is_file() or path.suffix not in (".safetensors", *_TORCH_SUFFIXES):
            return None
        location = path
    state = read_state(location)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    # A run's weights have both prefixes; torchvision's files may have features.* alone
    # (ConvNeXt, AlexNet), timm's head.* alone (its classifier).
    if not all(any(key.startswith(prefix) for key in state) for prefix in RUN_LAYOUT):
        if location is path:
            return None  # a torchvision-layout file
        raise ConfigError(f"model.pretrained={pretrained}: {location} holds no features.*/head.* weights")
    return state


def load_run_weights(network: nn.Module, state: dict, source: str) -> str:
    """Load a run's backbone (``features.*``) into ``network``, and its head when it fits (the
    same classes); a head of another class count stays freshly initialized. A method's own
    modules (``method.*``) are never loaded. Returns what was loaded, for the start line."""
    own = network.state_dict()
    features = {k: v for k, v in state.items() if k.startswith("features.")}
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    problems = [k for k in own if k.startswith("features.") and k not in features]
    problems += [k for k in features if k not in own or own[k].shape != features[k].shape]
    if problems:
        raise ConfigError(f"model.pretrained={source}: its backbone does not fit this model.arch "
                          f"({len(problems)} tensor(s) missing or of another shape, e.g. {problems[0]})")
    head_fits = bool(head) and set(head) == {k for k in own if k.startswith("head.")} \
        and all(own[k].shape == v.shape for k, v in head.items())
    network.load_state_dict({**features, **(head if head_fits else {})}, strict=False)
    if head_fits:
        return f"backbone and head from {source}"
    classes = next((v.shape[0] for k, v in own.items() if k.startswith("head.") and k.endswith("weight")), "?")
    return f"backbone from {source}; head initialized afresh for {classes} classes"


def weights_fingerprint(state: dict) -> str:
    """A hash of a state dict's names, shapes, dtypes and values: two networks start from the
    same weights when their fingerprints agree (model soups require it)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
