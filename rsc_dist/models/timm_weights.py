"""Pretrained weights for a timm backbone, from local files only, never a download.

``--model.pretrained`` for a ``timm/...`` arch is

- ``timm``: the model's weights where timm would have cached them: the Hugging Face hub cache
  (``HF_HUB_CACHE`` / ``HF_HOME``; the model's ``hf_hub_id`` with its file name, or
  ``model.safetensors`` / ``pytorch_model.bin``), else the torch hub cache
  (``TORCH_HOME/hub/checkpoints``, the file name of the model's ``url``);
- a path to a weights file: a state dict saved by timm (``.pth``/``.bin``/``.safetensors``,
  optionally under ``state_dict`` or ``model``), or any format timm's own loader for that
  model family converts (its ``checkpoint_filter_fn``): an OpenAI or open_clip CLIP checkpoint
  for timm's CLIP image towers (``visual.*`` keys; a TorchScript file such as OpenAI's
  ``ViT-B-16.pt`` is read too), a DINOv2 state dict for timm's DINOv2 ViTs, ... The filter also
  resamples a ViT's position embedding to the image size the model is built for.

The checkpoint's classifier (timm's ``pretrained_cfg['classifier']``) is always dropped: the
head gets a fresh one for the task's classes. Any other key the model lacks or misses is an
error naming the file, never a silent partial load.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from rsc_dist.core.errors import ConfigError

NEVER_DOWNLOADS = ("This tool never downloads weights at run time; use --model.pretrained=none for random "
                   "initialization.")


def cached_timm_weights(name: str) -> tuple[Path | None, list[str]]:
    """(the cached weights file of timm's model ``name``, or None; the places looked at)."""
    from timm.models import get_pretrained_cfg as pretrained_config

    config = pretrained_config(name)
    looked = []
    if config is None:
        return None, looked
    if config.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        repo = config.hf_hub_id.split("@")[0]
        filenames = [config.hf_hub_filename] if config.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return Path(found), looked
        looked.append(f"the Hugging Face cache ({HF_HUB_CACHE}: {repo}, {' or '.join(filenames)})")
    if config.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(config.url).path)
        if path.is_file():
            return path, looked
        looked.append(f"the torch hub cache ({path})")
    return None, looked


def timm_weights_path(name: str, pretrained: str | os.PathLike) -> Path:
    """The file ``--model.pretrained`` names for timm's model ``name``; FileNotFoundError when absent."""
    if str(pretrained) == "torchvision":
        raise ConfigError(f"model.pretrained=torchvision is for the torchvision backbones; for timm/{name} use "
                          "--model.pretrained=timm (timm's cache) or a weights file")
    if str(pretrained) != "timm":
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights for timm/{name} not found in {path}. {NEVER_DOWNLOADS}")
        return path
    path, looked = cached_timm_weights(name)
    if path is None:
        where = " or ".join(looked) or "no cache: timm names no weights file for this model"
        raise FileNotFoundError(f"pretrained weights for timm/{name} not found in {where}; copy the file there "
                                f"or pass --model.pretrained=/path/to/weights. {NEVER_DOWNLOADS}")
    return path


def read_state_dict(path: Path) -> dict:
    """The tensors of a weights file (safetensors, a torch state dict, or a TorchScript archive),
    unwrapped from a ``state_dict`` / ``model`` entry and a DDP ``module.`` prefix."""
    if path.suffix == ".npz":
        raise ConfigError(f"cannot read pretrained weights from {path}: JAX .npz checkpoints are converted by timm "
                          "when it downloads them; pass the PyTorch or safetensors file (e.g. from the Hugging "
                          "Face cache after timm.create_model(name, pretrained=True) on a machine with internet)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        elif _is_torchscript(path):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ConfigError(f"cannot read pretrained weights from {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"cannot read pretrained weights from {path}: not a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(part.split("/")[1:2] == ["code"] for part in archive.namelist())


def load_timm_weights(model: nn.Module, name: str, pretrained: str | os.PathLike) -> Path:
    """Load ``pretrained`` (module docstring) into timm's ``model`` (built for ``name``, not yet
    split), its classifier replaced; the file read. ConfigError when the weights do not fit."""
    from timm.models import get_pretrained_cfg as pretrained_config

    path = timm_weights_path(name, pretrained)
    state = read_state_dict(path)
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        try:
            state = convert(state, model)
        except Exception as exc:
            raise ConfigError(f"pretrained weights in {path} do not fit timm/{name}: timm's conversion for "
                              f"{type(model).__name__} failed ({type(exc).__name__}: {exc})") from exc
    classifiers = _classifier_names(model, pretrained_config(name))
    state = {key: value for key, value in state.items() if not _in_module(key, classifiers)}
    expected = model.state_dict()
    missing = [key for key in expected if key not in state and not _in_module(key, classifiers)]
    unexpected = [key for key in state if key not in expected]
    shapes = [f"{key} {tuple(state[key].shape)} instead of {tuple(expected[key].shape)}"
              for key in state if key in expected and state[key].shape != expected[key].shape]
    if missing or unexpected or shapes:
        raise ConfigError(f"pretrained weights in {path} do not fit timm/{name}: " + "; ".join(
            f"{label} {items[:3]}{' and %d more' % (len(items) - 3) if len(items) > 3 else ''}"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
            if items))
    model.load_state_dict(state, strict=False)
    return path


def _classifier_names(model: nn.Module, config) -> tuple[str, ...]:
    """The module paths of the model's classifier(s): timm's pretrained config names them."""
    names = getattr(config, "classifier", None) if config is not None else None
    if names:
        return (names,) if isinstance(names, str) else tuple(names)
    classifier = model.get_classifier()
    return tuple(path for path, module in model.named_modules() if module is classifier)


def _in_module(key: str, modules: tuple[str, ...]) -> bool:
    return any(key.startswith(module + ".") for module in modules)
