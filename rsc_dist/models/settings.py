"""The ``model`` section of the config: what the model builder (rsc_dist.models.build, the trainer's
build) reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rsc_dist.core.fields import setting
from rsc_dist.models.backbones import ARCHS


@dataclass(frozen=True)
class ModelConfig:
    arch: Literal[ARCHS] = setting("resnet18", "backbone (rsc_dist.models.BACKBONES)")
    pretrained: str | None = setting(
        None, 'None (random init), "torchvision" (local torchvision cache) or a weights file')
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
