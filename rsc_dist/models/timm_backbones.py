"""Any timm model as a backbone (``model.arch=timm/<model name>[.<pretrained tag>]``), split
into ``features(x) -> z`` and ``head(z) -> logits`` through timm's own API:
``forward_features`` and ``forward_head``.

How a model is split, with nothing written per family:

1. ``timm.create_model(name, num_classes=K)``, for the data's image size where the model is
   built for one (ViTs: ``img_size``); no download (``pretrained=False``; weights come from
   rsc_dist.models.timm_weights). Dropout and stochastic depth are switched off (p = 0): their
   masks would be drawn per rank, so N ranks would not compute what one process computes.
2. One forward of a zero image in eval mode records which submodules ``forward_features`` and
   ``forward_head`` call. The modules ``forward_head`` calls (the pooling, a norm, the
   classifier) move to the head: it owns their parameters, the features own the rest, and
   ``forward_head`` still reaches them as attributes of the timm model (they are only no
   longer registered there, so no parameter is counted twice).
3. The features' layout (rsc_dist.models.layouts) comes from the output's shape: a map (NCHW,
   or NHWC where ``output_fmt`` says so) or tokens with ``num_prefix_tokens`` prefix tokens.
4. Two probes of the head on random features (a private generator: the run's random stream is
   untouched) say whether its logits depend on the locations at all (a class-token head reads
   none of the patch tokens) and whether it is global average pooling and one linear layer
   (RSC's closed form then applies).

``head_blocks`` (timm ``VisionTransformer`` models): the last k transformer blocks and the final
norm move into the head, so z is the input of block n - k. With a class-token head this is
what lets RSC's spatial mode act on patch tokens that reach the logits (docs/method.md, "RSC on
tokens"); None chooses 1 for class-token heads and 0 otherwise.
"""

from __future__ import annotations

import difflib
import os

import torch
from torch import Tensor, nn

from rsc_dist.core.errors import ConfigError
from rsc_dist.models.layouts import FeatureLayout

TIMM_PREFIX = "timm/"
_PROBE_SEED = 20260507  # the head probes' private generator (never the global one)


def timm_model_name(arch: str) -> str | None:
    """``resnet50.ram_in1k`` for ``timm/resnet50.ram_in1k``; None for a torchvision name."""
    return arch[len(TIMM_PREFIX):] if arch.startswith(TIMM_PREFIX) else None


def check_timm_name(name: str) -> None:
    """ConfigError (one line, with the closest names) unless timm knows the model and its tag."""
    import timm

    base, _, tag = name.partition(".")
    if not name or not timm.is_model(base):
        close = difflib.get_close_matches(name, timm.list_models() + timm.list_pretrained(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else \
            " (python -c \"import timm; print(timm.list_models('*vit*'))\" lists models by pattern)"
        raise ConfigError(f"model.arch: timm {timm.__version__} has no model {name!r}{hint}")
    if tag:
        tags = sorted(t.partition(".")[2] for t in timm.list_pretrained(f"{base}.*"))
        if tag not in tags:
            raise ConfigError(f"model.arch: timm's {base} has no pretrained tag {tag!r}; its tags: {', '.join(tags)}")


def pretrained_config(name: str):
    """timm's pretrained config for the model (its default tag's when none is named), or None."""
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(name)


def preprocessing(name: str) -> dict:
    """The input the model's weights were trained with: ``data.mean``, ``data.std`` and
    ``data.image_size`` (what a config that does not set them uses)."""
    config = pretrained_config(name)
    if config is None:
        return {}
    values = {"mean": tuple(config.mean), "std": tuple(config.std)}
    _, height, width = config.input_size
    if height == width:
        values["image_size"] = height
    return values


# ---------------------------------------------------------------------------------------------
# The modules


class TimmFeatures(nn.Module):
    """``forward_features`` of a timm model (the modules its head uses are not in it)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)


class TimmHead(nn.Module):
    """``forward_head`` of a timm model, owning the modules it calls (and, with head_blocks,
    the last transformer blocks and the final norm).

    ``pooled(z)`` is ``forward_head(..., pre_logits=True)``: the vector the classifier reads.
    """

    def __init__(self, model: nn.Module, parts: dict[str, nn.Module], layout: FeatureLayout,
                 blocks: nn.Module | None = None, final_norm: nn.Module | None = None):
        super().__init__()
        # A reference, not a submodule: the model's modules belong to TimmFeatures and this head.
        object.__setattr__(self, "_timm_model", model)
        for path, module in parts.items():
            self.add_module(path.replace(".", "_"), module)
        self.blocks = blocks
        self.final_norm = final_norm
        self.layout = layout
        # Set by the probes (probe_head) once the head is complete.
        self.in_channels = 0
        self.locations_reach_logits = True
        self._closed_form_name: str | None = None

    @property
    def closed_form_classifier(self) -> nn.Linear | None:
        return None if self._closed_form_name is None else self.get_submodule(self._closed_form_name)

    def _head_input(self, z: Tensor) -> Tensor:
        if self.blocks is not None:
            z = self.final_norm(self.blocks(z))
        return z

    def pooled(self, z: Tensor) -> Tensor:
        return self._timm_model.forward_head(self._head_input(z), pre_logits=True)

    def forward(self, z: Tensor) -> Tensor:
        return self._timm_model.forward_head(self._head_input(z))


# ---------------------------------------------------------------------------------------------
# Building and splitting


def create_timm_model(name: str, num_classes: int, image_size: int | None) -> nn.Module:
    """The model with a fresh ``num_classes`` classifier, for ``image_size`` where it is built
    for a fixed input size, with dropout and stochastic depth switched off."""
    import timm

    config = pretrained_config(name)
    kwargs = {"num_classes": num_classes}
    if image_size is not None and config is not None and config.fixed_input_size:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        if "img_size" not in kwargs or "img_size" not in str(exc):
            raise
        size = config.input_size[-1]
        raise ConfigError(f"timm/{name} is built for {size} px input and takes no other size: "
                          f"set --data.image_size={size}") from None
    switch_off_stochastic_layers(model)
    return model


def switch_off_stochastic_layers(model: nn.Module) -> list[str]:
    """Set every dropout, drop-path (stochastic depth), drop-block and patch-dropout rate to 0;
    the paths of the modules that had one. Their masks are drawn from the process's random
    state, which differs between ranks: with them a step would depend on how the batch is split."""
    switched = []
    for path, module in model.named_modules():
        attrs = ["drop_rate"]  # the rate timm heads pass to F.dropout
        if isinstance(module, nn.modules.dropout._DropoutNd) or "Drop" in type(module).__name__:
            attrs += ["p", "drop_prob", "prob"]
        rates = [attr for attr in attrs if isinstance(getattr(module, attr, None), float) and getattr(module, attr) > 0]
        for attr in rates:
            setattr(module, attr, 0.0)
        if rates:
            switched.append(path or type(module).__name__)
    return switched


def split_timm_model(name: str, model: nn.Module, image_size: int | None,
                     head_blocks: int | None) -> tuple[TimmFeatures, TimmHead]:
    """``features`` and ``head`` of a timm model (module docstring: how)."""
    config = pretrained_config(name)
    size = image_size or (config.input_size[-1] if config is not None else 224)
    try:
        z, head_calls, feature_calls = _trace(model, size)
    except (AssertionError, RuntimeError) as exc:  # e.g. a patch size that does not divide the image
        raise ConfigError(f"timm/{name} cannot run on {size} x {size} px inputs (data.image_size): "
                          f"{str(exc).strip().splitlines()[-1]}") from exc
    overlap = [path for path in head_calls if any(f == path or f.startswith(path + ".") for f in feature_calls)]
    if overlap:
        raise ConfigError(f"timm/{name} cannot be split into features and head: its forward_head calls "
                          f"{overlap[0]}, which forward_features calls too")
    parts = {path: _hand_over(model, path) for path in head_calls}
    layout = feature_layout(model, z, name)
    head = TimmHead(model, parts, layout)
    if head_blocks is None:
        probe_head(head, z)
        head_blocks = 1 if not head.locations_reach_logits and splits_into_blocks(model) else 0
    if head_blocks:
        blocks, final_norm = _move_blocks(name, model, head_blocks)
        head = TimmHead(model, parts, layout, blocks, final_norm)
    probe_head(head, z)
    return TimmFeatures(model), head


def splits_into_blocks(model: nn.Module) -> bool:
    """A timm VisionTransformer whose forward_features ends with ``blocks`` then ``norm``."""
    from timm.models.vision_transformer import VisionTransformer

    return (isinstance(model, VisionTransformer)
            and type(model).forward_features is VisionTransformer.forward_features
            and isinstance(model.blocks, nn.Sequential) and len(model.blocks) > 1)


def _move_blocks(name: str, model: nn.Module, count: int) -> tuple[nn.Sequential, nn.Module]:
    if not splits_into_blocks(model):
        raise ConfigError(f"model.head_blocks={count}: timm/{name} ({type(model).__name__}) is not a timm "
                          "VisionTransformer whose features end with its blocks and norm; use model.head_blocks=0")
    blocks = list(model.blocks)
    if not 0 < count < len(blocks):
        raise ConfigError(f"model.head_blocks={count}: timm/{name} has {len(blocks)} blocks; "
                          f"choose 0 to {len(blocks) - 1}")
    model.blocks = nn.Sequential(*blocks[:-count])
    final_norm = model.norm
    model.norm = nn.Identity()
    return nn.Sequential(*blocks[-count:]), final_norm


def _trace(model: nn.Module, size: int) -> tuple[Tensor, list[str], set[str]]:
    """(features of a zero image, the outermost modules forward_head calls, every module
    forward_features calls), in eval mode and without gradients."""
    calls: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda _m, _a, path=path: calls.append(path))
             for path, module in model.named_modules() if path]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            z = model.forward_features(torch.zeros(1, 3, size, size))
            feature_count = len(calls)
            logits = model.forward_head(z)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if not isinstance(z, Tensor) or not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ConfigError(f"{type(model).__name__}: forward_features and forward_head must return tensors "
                          "(features, then logits (N, K)); this timm model returns something else")
    head_calls = list(dict.fromkeys(calls[feature_count:]))
    roots = [path for path in head_calls if not any(path.startswith(other + ".") for other in head_calls)]
    return z, roots, set(calls[:feature_count])


def _hand_over(model: nn.Module, path: str) -> nn.Module:
    """Unregister the submodule at ``path`` from the timm model, leaving it reachable as the
    same attribute (``forward_head`` reads ``self.<name>``), and return it for the head to own."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module = parent._modules.pop(attr)
    object.__setattr__(parent, attr, module)
    return module


def feature_layout(model: nn.Module, z: Tensor, name: str) -> FeatureLayout:
    """The layout of ``forward_features``' output (rsc_dist.models.layouts)."""
    if z.dim() == 4:
        channels_last = str(getattr(model, "output_fmt", "NCHW")).upper().endswith("NHWC")
        return FeatureLayout("nhwc" if channels_last else "nchw")
    if z.dim() == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        grid = tuple(int(g) for g in grid) if grid is not None else None
        if grid is not None and (len(grid) != 2 or grid[0] * grid[1] != z.shape[1] - prefix):
            grid = None
        return FeatureLayout("tokens", prefix, grid)
    raise ConfigError(f"timm/{name}: forward_features returns shape {tuple(z.shape)}, neither a feature "
                      "map (N, C, H, W) nor tokens (N, T, D)")


def probe_head(head: TimmHead, z: Tensor) -> None:
    """Set what the head's probes tell (module docstring, step 4): ``in_channels`` (the size of
    the pooled features), ``locations_reach_logits`` and the closed form's classifier."""
    model = head._timm_model
    was_training = head.training
    head.eval()
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    probes = [torch.randn((2, *z.shape[1:]), generator=generator, dtype=z.dtype) for _ in range(2)]
    try:
        with torch.no_grad():
            head.in_channels = int(head.pooled(probes[0]).shape[1])
            classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
            pooled_linear = head.blocks is None and all(_is_pooled_linear(head, classifier, probe) for probe in probes)
        probe = probes[1].requires_grad_(True)
        with torch.enable_grad():
            (gradient,) = torch.autograd.grad(head(probe).sum(), inputs=probe)
    finally:
        head.train(was_training)
    head.locations_reach_logits = bool(head.layout.locations(gradient).abs().amax() > 0)
    head._closed_form_name = None
    if pooled_linear:
        head._closed_form_name = next(path for path, module in head.named_modules() if module is classifier)


def _is_pooled_linear(head: TimmHead, classifier, z: Tensor) -> bool:
    """Whether ``head(z)`` is ``classifier`` applied to the mean of z over its locations."""
    mean = head.layout.locations(z).mean(dim=1)
    if not isinstance(classifier, nn.Linear) or mean.shape[-1] != classifier.in_features:
        return False
    return torch.allclose(head(z), classifier(mean), rtol=1e-5, atol=1e-6)


def build_timm_backbone(name: str, num_classes: int, *, image_size: int | None = None,
                        pretrained: str | os.PathLike | None = None,
                        head_blocks: int | None = None) -> tuple[TimmFeatures, TimmHead]:
    """A timm model as ``(features, head)``; ``pretrained``: None (random init), "timm" (its
    weights in the timm / Hugging Face cache, never downloaded) or a weights file
    (rsc_dist.models.timm_weights)."""
    from rsc_dist.models.timm_weights import load_timm_weights

    check_timm_name(name)
    model = create_timm_model(name, num_classes, image_size)
    if pretrained not in (None, "", "none"):
        load_timm_weights(model, name, pretrained)
    return split_timm_model(name, model, image_size, head_blocks)
