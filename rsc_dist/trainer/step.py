"""One training step: the batch on the device (``prepare_batch``), then forward, the method's loss,
one backward and the optimizer step (``train_step``), the same for every method."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rsc_dist import methods
from rsc_dist.config import Config
from rsc_dist.data.streams import device_images, normalize_on_device


@dataclass(frozen=True)
class StepInputs:
    images: torch.Tensor  # normalized float, on the device
    labels: torch.Tensor
    draws: dict  # the method's per-step draws: keyword arguments of the model's forward
    pixels: torch.Tensor  # the augmented uint8 images (before flip doubling), for mask grids
    sample_ids: torch.Tensor | None = None  # each image's identity in the global order (int64)
    domains: torch.Tensor | None = None  # each image's domain index (the manifest's order)


def prepare_batch(config: Config, batch: dict, device, step: int, steps_per_epoch: int) -> StepInputs:
    """Device transfer (or decoding and augmentation on the device), normalization, the released
    recipe's flip doubling, the method's per-step draws."""
    if "params" in batch:  # data.decode=device: the loader sent encoded bytes and parameters
        pixels = device_images(batch, device)
    else:
        pixels = batch["image"].to(device, non_blocking=True)
    images = pixels
    labels = batch["label"].to(device, non_blocking=True)
    ids = batch["sample_id"].to(device, non_blocking=True) if "sample_id" in batch else None
    domains = batch["domain"].to(device, non_blocking=True) if "domain" in batch else None
    if config.data.flip_double:
        images = torch.cat([images, images.flip(-1)])
        labels = torch.cat([labels, labels])
        ids = torch.cat([ids, ~ids]) if ids is not None else None  # the mirror image: another identity
        domains = torch.cat([domains, domains]) if domains is not None else None
    images = normalize_on_device(images, config.data.mean, config.data.std,
                                 channels_last=config.model.channels_last)
    draws = methods.get(config.algorithm).draws(config, step, steps_per_epoch, ids)
    return StepInputs(images, labels, draws, pixels, ids, domains)


def train_step(accelerator, model, optimizer, scheduler, inputs: StepInputs) -> dict:
    """Forward (the method inside the model), the method's loss, one backward, optimizer and
    schedule step: the same for every method.

    Returns device tensors only (no host sync): loss, correct count, the method's metrics, and
    its mask when it has one (for the mask image grids).
    """
    method = accelerator.unwrap_model(model).method
    with accelerator.accumulate(model):
        with accelerator.autocast():
            logits, extras = model(inputs.images, inputs.labels, return_extras=True, **inputs.draws)
            loss, metrics = method.loss(logits, inputs.labels, extras, inputs.domains)
        accelerator.backward(loss)
        optimizer.step()
        if accelerator.sync_gradients:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    correct = (logits.detach().argmax(1) == inputs.labels).sum()
    return {"loss": loss.detach(), "correct": correct, "metrics": metrics, "mask": extras.get("mask")}
