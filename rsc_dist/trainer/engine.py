"""The pieces of the training loop: optimizer and schedule, one train step, evaluation, and the
stop agreement between ranks. ``rsc_dist.loop`` wires them together."""

from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import dataclass, field

import torch
from torch import nn

from rsc_dist import methods
from rsc_dist.core import selection
from rsc_dist.config import Config
from rsc_dist.data.streams import device_images, normalize_on_device



# ---------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def build_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    opt = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov,
                               weight_decay=opt.weight_decay)
    return torch.optim.Adam(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)


def lr_factor(config: Config, optimizer_step: int, total_optimizer_steps: int) -> float:
    """Multiplier of the base learning rate at an optimizer step (a pure function)."""
    sched = config.schedule
    if sched.warmup_steps and optimizer_step < sched.warmup_steps:
        return (optimizer_step + 1) / sched.warmup_steps
    if sched.name == "constant":
        return 1.0
    if sched.name == "step":
        passed = sum(optimizer_step >= round(m * total_optimizer_steps) for m in sched.milestones)
        return sched.gamma**passed
    span = max(1, total_optimizer_steps - sched.warmup_steps)
    progress = min(1.0, (optimizer_step - sched.warmup_steps) / span)
    return 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(config: Config, optimizer, total_optimizer_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(config, step, total_optimizer_steps)
    )


# ---------------------------------------------------------------------------------------------
# Progress that a checkpoint carries


@dataclass
class TrainState:
    """Everything about a run's progress that is not a tensor of the model or optimizer."""

    step: int = 0  # global batches trained on (the data position derives from it)
    data_order: dict = field(default_factory=dict)  # plan.data_order() at save time
    settings: dict = field(default_factory=dict)  # config.trajectory_settings at save time (what it hashes)
    forced_resumes: list = field(default_factory=list)  # what --resume force continued despite
    best: dict = field(default_factory=dict)  # the evaluation train.selection chose so far ({}: none)
    last: dict = field(default_factory=dict)  # the most recent evaluation
    history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"step": self.step, "best": self.best, "last": self.last, "history": self.history,
                "data_order": self.data_order, "settings": self.settings,
                "forced_resumes": self.forced_resumes}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best, self.last = state["step"], state["best"], state["last"]
        self.history = state["history"]
        # Checkpoints of the rank-dependent order (before order_version 2) have "stream_layout".
        self.data_order = state.get("data_order", {"order_version": 1, **state.get("stream_layout", {})})
        self.settings = state.get("settings", {})
        self.forced_resumes = state.get("forced_resumes", [])

    def record_evaluation(self, evaluation: dict, rule: str = "source_val_pooled") -> bool:
        """Store an evaluation; True when ``rule`` (rsc_dist.selection) makes it the new best.
        An evaluation the rule cannot score (no source validation) never becomes the best."""
        self.last = evaluation
        self.history.append(evaluation)
        if selection.replaces(rule, evaluation, self.best):
            self.best = evaluation
            return True
        return False


# ---------------------------------------------------------------------------------------------
# One training step


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


# ---------------------------------------------------------------------------------------------
# Evaluation: every sample counted once across ranks


@torch.no_grad()
def evaluate(accelerator, model, loaders: dict, config: Config, num_domains: int) -> dict:
    """Per-domain top-1/top-5 correct and total counts, summed over ranks.

    ``loaders`` maps a role ("val" or "target") to a loader of that role's samples. The
    unwrapped module is used: evaluation runs no backward, so DDP's hooks are not involved.
    """
    module = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:
        # DDP broadcasts rank 0's BatchNorm statistics before each forward, then every rank
        # updates its copy with its own batch: evaluate rank 0's (the checkpointed) model.
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)
    was_training = module.training
    module.eval()
    device = accelerator.device
    counts = {role: torch.zeros(3, num_domains, device=device, dtype=torch.float64) for role in loaders}
    for role, loader in loaders.items():
        for batch in start_loader(loader):
            images = normalize_on_device(batch["image"].to(device, non_blocking=True),
                                         config.data.mean, config.data.std,
                                         channels_last=config.model.channels_last)
            labels = batch["label"].to(device, non_blocking=True)
            domains = batch["domain"].to(device, non_blocking=True)
            with evaluation_autocast(accelerator):
                logits = module(images)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit1 = (top[:, 0] == labels).double()
            hit5 = (top == labels[:, None]).any(dim=1).double()
            counts[role][0].index_add_(0, domains, hit1)
            counts[role][1].index_add_(0, domains, hit5)
            counts[role][2].index_add_(0, domains, torch.ones_like(hit1))
    module.train(was_training)
    return {role: accelerator.reduce(c, reduction="sum").cpu() for role, c in counts.items()}


def evaluation_autocast(accelerator):
    """The autocast training's forward runs under, for evaluation's forwards: bf16 runs evaluate in
    bf16 under DDP and DeepSpeed alike, as rsc_dist.evaluate does.

    Under DeepSpeed, Accelerate's autocast does nothing: the engine's own forward autocasts (its
    torch_autocast section, build.use_deepspeed_mixed_precision). Evaluation calls the unwrapped
    module (or ZeRO-3's gathered copy), so it takes the dtype from that section here.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return accelerator.autocast()
    section = plugin.deepspeed_config.get("torch_autocast") or {}
    if not section.get("enabled"):
        return contextlib.nullcontext()
    dtype = str(section.get("dtype", "bfloat16")).removeprefix("torch.")
    return torch.autocast(accelerator.device.type, dtype=getattr(torch, dtype))


def summarize_evaluation(counts: dict, domains: tuple[str, ...], step: int, sources: tuple[str, ...] = (),
                         targets: tuple[str, ...] = ()) -> dict:
    """One evaluation record (layout: rsc_dist/core/contracts.py, EVALUATION_RECORD) from summed
    counts. ``sources``/``targets`` list every domain of the role, so one without samples shows
    as n = 0; without them, the domains that had samples."""
    result = {"step": step, "val_acc": None, "val_acc_mean": None, "val_per_domain": {}, "val_n": {},
              "target_acc": {}, "target_top5": {}, "target_n": {}}

    def per_domain(role: str, listed: tuple[str, ...]):
        """Yield (domain, index, n) for the role's domains, each with its count recorded."""
        total = counts[role][2]
        for domain in listed or tuple(d for i, d in enumerate(domains) if total[i] > 0):
            i = domains.index(domain)
            result[f"{role}_n"][domain] = int(total[i])
            yield domain, i, total[i]

    if "val" in counts:
        top1, _, total = counts["val"]
        for domain, i, n in per_domain("val", sources):
            if n > 0:
                result["val_per_domain"][domain] = float(top1[i] / n)
        if total.sum() > 0:
            result["val_acc"] = float(top1.sum() / total.sum())
    elif sources:
        result["val_n"] = {domain: 0 for domain in sources}
    result["val_acc_mean"] = selection.source_val_mean(result)
    if "target" in counts:
        top1, top5, _ = counts["target"]
        for domain, i, n in per_domain("target", targets):
            if n > 0:
                result["target_acc"][domain] = float(top1[i] / n)
                result["target_top5"][domain] = float(top5[i] / n)
    return result


# ---------------------------------------------------------------------------------------------
# Stopping: signals and non-finite losses, agreed on by all ranks at a step boundary


class StopFlags:
    """SIGTERM/SIGUSR1 only set a flag; ``agree`` all-reduces it (MAX) with the NaN flag."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device):
        self.signalled = ""  # why a stop was requested on this rank
        self.nonfinite = torch.zeros((), device=device, dtype=torch.bool)

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        self.signalled = reason

    def track_loss(self, loss: torch.Tensor) -> None:
        self.nonfinite |= ~torch.isfinite(loss)

    def agree(self, accelerator) -> tuple[bool, bool]:
        """(stop requested on any rank, non-finite loss on any rank). One collective."""
        flags = torch.stack([
            torch.tensor(float(bool(self.signalled)), device=self.nonfinite.device),
            self.nonfinite.float(),
        ])
        if accelerator.num_processes > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        stop, nonfinite = flags.tolist()
        return stop > 0, nonfinite > 0


def start_loader(loader):
    """``iter(loader)`` with the stop signals held back while it forks its workers.

    A job's SIGTERM reaches every process, loader workers included. torch gives a new worker a
    handler that dies on SIGTERM before data._worker_init can set it to ignored; a worker killed
    in that window ends its rank with "DataLoader worker exited unexpectedly" instead of a
    checkpoint (seen once in a SIGTERM test at an epoch start, where new workers are forked).
    Forked workers inherit the blocked mask and keep it (they ignore these signals anyway);
    in this process a signal that arrived meanwhile is delivered when the mask is restored.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, StopFlags.SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
