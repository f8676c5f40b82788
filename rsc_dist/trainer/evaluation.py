"""Evaluation: per-domain top-1/top-5 counts and summed cross-entropy, every sample counted once
across ranks, and the evaluation record made from them."""

from __future__ import annotations

import contextlib
import statistics

import torch
import torch.nn.functional as F

from rsc_dist.config import Config
from rsc_dist.core import selection
from rsc_dist.data.streams import normalize_on_device
from rsc_dist.trainer.unwrap import plain_module


COUNT_ROWS = ("top1", "top5", "n", "loss_sum")


@torch.no_grad()
def evaluate(accelerator, model, loaders: dict, config: Config, num_domains: int) -> dict:
    """Per-domain counts summed over ranks: rows COUNT_ROWS (top-1 and top-5 correct, samples,
    summed cross-entropy), one column per domain.

    ``loaders`` maps a role ("val" or "target") to a loader of that role's samples. The
    unwrapped module is used: evaluation runs no backward, so DDP's hooks are not involved.
    """
    module = plain_module(accelerator, model)
    if accelerator.num_processes > 1:
        # DDP broadcasts rank 0's BatchNorm statistics before each forward, then every rank
        # updates its copy with its own batch: evaluate rank 0's (the checkpointed) model.
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)
    was_training = module.training
    module.eval()
    device = accelerator.device
    counts = {role: torch.zeros(len(COUNT_ROWS), num_domains, device=device, dtype=torch.float64) for role in loaders}
    for role, loader in loaders.items():
        for batch in loader:
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
            # Summed, not averaged per batch: a domain's mean loss is then its sum over all
            # ranks' samples divided by their count, the same on any number of ranks.
            loss = F.cross_entropy(logits.float(), labels, reduction="none").double()
            counts[role][3].index_add_(0, domains, loss)
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
              "val_loss": None, "val_loss_mean": None, "val_loss_per_domain": {},
              "target_acc": {}, "target_top5": {}, "target_n": {}, "target_out_acc": {}, "target_out_n": {}}

    def per_domain(role: str, listed: tuple[str, ...]):
        """Yield (domain, index, n) for the role's domains, each with its count recorded."""
        total = counts[role][2]
        for domain in listed or tuple(d for i, d in enumerate(domains) if total[i] > 0):
            i = domains.index(domain)
            result[f"{role}_n"][domain] = int(total[i])
            yield domain, i, total[i]

    if "val" in counts:
        top1, _, total, loss_sum = counts["val"]
        for domain, i, n in per_domain("val", sources):
            if n > 0:
                result["val_per_domain"][domain] = float(top1[i] / n)
                result["val_loss_per_domain"][domain] = float(loss_sum[i] / n)
        if total.sum() > 0:
            result["val_acc"] = float(top1.sum() / total.sum())
            result["val_loss"] = float(loss_sum.sum() / total.sum())
    elif sources:
        result["val_n"] = {domain: 0 for domain in sources}
    result["val_acc_mean"] = selection.source_val_mean(result)
    result["val_loss_mean"] = source_val_loss_mean(result)
    if "target" in counts:
        top1, top5 = counts["target"][0], counts["target"][1]
        for domain, i, n in per_domain("target", targets):
            if n > 0:
                result["target_acc"][domain] = float(top1[i] / n)
                result["target_top5"][domain] = float(top5[i] / n)
    if "target_out" in counts:  # a holdout's target out-splits (DomainBed's oracle reads them)
        top1 = counts["target_out"][0]
        for domain, i, n in per_domain("target_out", targets):
            if n > 0:
                result["target_out_acc"][domain] = float(top1[i] / n)
    return result


def source_val_loss_mean(evaluation: dict) -> float | None:
    """The mean over source domains of each one's mean validation cross-entropy (what SWAD's
    loss-valley rule reads: the authors' ``tr_outloss``); None when a source has no val sample."""
    per_domain, counts = evaluation.get("val_loss_per_domain") or {}, evaluation.get("val_n") or {}
    if not counts or any(n <= 0 or d not in per_domain for d, n in counts.items()):
        return None
    return statistics.fmean(per_domain[d] for d in counts)
