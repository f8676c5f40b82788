"""The ``model`` section of the config: what the model builder (rsc_dist.models.build, the trainer's
build) reads."""

from __future__ import annotations

from dataclasses import dataclass

from rsc_dist.core.fields import setting
from rsc_dist.models.backbones import ARCHS


@dataclass(frozen=True)
class ModelConfig:
    arch: str = setting(
        "resnet18", f"backbone: {', '.join(ARCHS)} (torchvision), or timm/<model name>[.<pretrained tag>] "
        "(any timm model, e.g. timm/resnet50.ram_in1k, timm/vit_base_patch16_224; built with its dropout and "
        "stochastic depth off, so that N ranks compute what one process computes)")
    pretrained: str | None = setting(
        None, 'None (random init), "torchvision" (torchvision backbones: the torchvision cache), "timm" (timm '
        'backbones: the timm / Hugging Face cache) or a weights file (a timm, OpenAI or open_clip checkpoint for '
        'timm backbones); never downloaded')
    head_blocks: int | None = setting(
        None, "timm ViTs: the last transformer blocks (and the final norm) counted in the head, so that z, where "
        "RSC acts, is their input; null: 1 where the head reads the class token only (its patch tokens then "
        "reach the logits), else 0", check="nonnegative")
    sync_bn: bool = setting(False, "SyncBatchNorm across ranks (GPUs only)")
    freeze_bn: bool = setting(
        False, "BatchNorm layers stay in eval mode while training (DomainBed's default): fine-tuning "
        "with frozen statistics; the step then does not depend on how the batch is split over ranks")
    dropout: float = setting(
        0.0, "DomainBed's resnet_dropout: dropout on the pooled features before the head (whole channels "
        "of the feature map, masks drawn from each sample's identity and the step: the same on any number "
        "of processes)", check="fraction")
    channels_last: bool = setting(True, "channels_last memory format (faster convolutions on GPUs)")
    compile: bool = setting(False, "torch.compile the backbone (RSC itself stays eager)")
