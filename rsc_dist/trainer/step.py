"""One training step: the batch on the device (``prepare_batch``), the method's per-step draws,
then the method's own step (``train_step``: by default one forward, one backward, one optimizer
step) driven through a ``Runner``, and the schedule step.

The method decides what a step computes (rsc_dist.methods.base); the runner is how it reaches
the prepared model and optimizer: its forward runs the method's objective inside the wrapped
model's forward (DDP's hooks, ZeRO-3's gathering), its optimizer steps may be limited to named
parameter groups, and it writes a method's persistent state after the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rsc_dist.config import Config
from rsc_dist.data.streams import device_images, normalize_on_device
from rsc_dist.methods.base import Method, StepBatch, StepOutput


def prepare_batch(config: Config, batch: dict, device) -> StepBatch:
    """Device transfer (or decoding and augmentation on the device), normalization, the released
    recipe's flip doubling."""
    if "params" in batch:  # data.decode=device: the loader sent encoded bytes and parameters
        pixels = device_images(batch, device)
    else:
        pixels = batch["image"].to(device, non_blocking=True)
    images = pixels
    labels = batch["label"].to(device, non_blocking=True)
    ids = batch["sample_id"].to(device, non_blocking=True) if "sample_id" in batch else None
    domains = batch["domain"].to(device, non_blocking=True) if "domain" in batch else None
    order = batch["order"].to(device, non_blocking=True) if "order" in batch else None
    if config.data.flip_double:
        images = torch.cat([images, images.flip(-1)])
        labels = torch.cat([labels, labels])
        ids = torch.cat([ids, ~ids]) if ids is not None else None  # the mirror image: another identity
        domains = torch.cat([domains, domains]) if domains is not None else None
        # The mirror copies follow every original of the global batch.
        order = torch.cat([order, order + batch["order_span"]]) if order is not None else None
    images = normalize_on_device(images, config.data.mean, config.data.std,
                                 channels_last=config.model.channels_last)
    return StepBatch(images=images, labels=labels, pixels=pixels, sample_ids=ids, domains=domains, order=order)


class Runner:
    """What a method's ``train_step`` drives (rsc_dist.methods.base.StepRunner)."""

    def __init__(self, accelerator, model, optimizer, network, step: int):
        """``model``: the prepared (wrapped) model; ``network``: the module inside it."""
        self.accelerator, self.model, self.optimizer, self.network = accelerator, model, optimizer, network
        self.step = step

    def forward(self, objective, batch: StepBatch, draws: dict) -> StepOutput:
        with self.accelerator.autocast():
            return self.model(batch.images, objective=objective, batch=batch, draws=draws)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def optimizer_step(self, groups: tuple[str, ...] | None = None) -> None:
        if groups is not None:
            names = {group.get("name", "model") for group in self.optimizer.param_groups}
            unknown = set(groups) - names
            if unknown:
                raise ValueError(f"no parameter group named {sorted(unknown)}; the optimizer has {sorted(names)}")
            # A parameter without a gradient is skipped by torch's optimizers (no state update,
            # no weight decay): the groups not named here are left exactly as they are.
            for group in self.optimizer.param_groups:
                if group.get("name", "model") not in groups:
                    for parameter in group["params"]:
                        parameter.grad = None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def reset_optimizer_state(self) -> None:
        inner = self.optimizer
        while hasattr(inner, "optimizer"):  # Accelerate's and DeepSpeed's wrappers
            inner = inner.optimizer
        inner.state.clear()  # torch's optimizers create each state afresh at the next step

    def write_state(self, state: dict) -> None:
        if not state:
            return
        module = self.network.method
        with torch.no_grad():
            for name, value in state.items():
                module.get_buffer(name).copy_(value)


@dataclass
class Trainables:
    """A run's prepared model (DDP or DeepSpeed), the network inside it, its optimizer, schedule
    and method (rsc_dist.trainer.build.training_objects), its weight average (train.averaging)
    and the fingerprint of the weights it started from."""

    model: torch.nn.Module
    network: torch.nn.Module
    optimizer: object
    scheduler: object
    method: Method
    averaging: object = None  # rsc_dist.averaging.averager.Averager, or None
    init_fingerprint: str | None = None


def train_on_batch(accelerator, trained: Trainables, config: Config, batch: dict, step: int,
                   steps_per_epoch: int) -> tuple[dict, StepBatch]:
    """A loader's batch for global step ``step``: on the device, the method's draws, its step.
    Returns train_step's values and the batch as the method saw it."""
    inputs = prepare_batch(config, batch, accelerator.device).replace(step=step)
    draws = trained.method.draws(step, steps_per_epoch, inputs.sample_ids)
    out = train_step(accelerator, trained.model, trained.optimizer, trained.scheduler, trained.method,
                     trained.network, inputs, draws, step, averaging=trained.averaging)
    return out, inputs


def train_step(accelerator, model, optimizer, scheduler, method, network, batch: StepBatch, draws: dict,
               step: int, averaging=None) -> dict:
    """The method's step, then the schedule's and the weight average's (once per optimizer step).

    Returns device tensors only (no host sync): loss, correct count, the method's metrics, and
    its feature mask when it has one (for the mask image grids).
    """
    runner = Runner(accelerator, model, optimizer, network, step)
    with accelerator.accumulate(model):
        out = method.train_step(runner, batch, draws)
        if accelerator.sync_gradients:
            scheduler.step()
            if averaging is not None:
                averaging.after_optimizer_step(step + 1)
    if out.logits is not None:
        correct = (out.logits.detach().argmax(1) == batch.labels).sum()
    else:
        correct = torch.zeros((), device=batch.labels.device, dtype=torch.long)
    return {"loss": out.loss.detach(), "correct": correct, "metrics": out.metrics, "mask": out.mask,
            "mask_mode": out.mask_mode}
