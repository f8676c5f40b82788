"""What a run shows: W&B through Accelerate's trackers (main process only, offline without an
API key), step metrics without per-step host syncs, RSC mask images, results.json, and the
console accuracy table."""

from __future__ import annotations

import hashlib
import netrc
import os
import time
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from rsc_dist.config import Config, to_dict


# ---------------------------------------------------------------------------------------------
# W&B


def wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def wandb_mode(config: Config) -> str:
    """online | offline | disabled. "auto" honours WANDB_MODE, else offline without a key."""
    if config.wandb.mode != "auto":
        return config.wandb.mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    return "online" if wandb_api_key_configured() else "offline"


def tracker_name(config: Config) -> str | None:
    return None if wandb_mode(config) == "disabled" else "wandb"


def wandb_run_id(run_dir: Path) -> str:
    """Stable per run folder, so a requeued or resumed job continues the same W&B run."""
    return os.environ.get("WANDB_RUN_ID") or hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]


class Tracking:
    def __init__(self, accelerator, enabled: bool):
        self.accelerator = accelerator
        self.enabled = enabled

    def _run(self):
        return self.accelerator.get_tracker("wandb", unwrap=True) if self.enabled else None

    def log(self, values: dict, step: int) -> None:
        if self.enabled:
            self.accelerator.log(values, step=step)

    def log_evaluation(self, evaluation: dict, step: int) -> None:
        values = {}
        if evaluation["val_acc"] is not None:
            values["val/acc"] = evaluation["val_acc"]
        values.update({f"val/acc_{d}": a for d, a in evaluation["val_per_domain"].items()})
        values.update({f"target/acc_{d}": a for d, a in evaluation["target_acc"].items()})
        values.update({f"target/top5_{d}": a for d, a in evaluation["target_top5"].items()})
        self.log(values, step)
        line = ", ".join(f"{k} {v:.4f}" for k, v in values.items())
        self.accelerator.print(f"step {step}: {line}")

    def log_masks(self, images: torch.Tensor, mask: torch.Tensor | None, mode: str, step: int) -> None:
        if not self.enabled or mask is None or not self.accelerator.is_main_process:
            return
        import wandb

        grid = mask_overlay_grid(images, mask)
        self._run().log({"rsc/masks": wandb.Image(grid.permute(1, 2, 0).numpy(),
                                                  caption=f"step {step}, {mode} mask (red = muted)")},
                        step=step)

    def log_summary(self, results: dict) -> None:
        run = self._run()
        if run is None:
            return
        for key in ("best", "last"):
            for domain, acc in results[key]["target_acc"].items():
                run.summary[f"{key}/target_acc_{domain}"] = acc
            if results[key].get("val_acc") is not None:
                run.summary[f"{key}/val_acc"] = results[key]["val_acc"]



def start_tracking(accelerator, config: Config, run_dir: Path, plan) -> Tracking:
    mode = wandb_mode(config)
    if mode == "disabled":
        return Tracking(accelerator, enabled=False)
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    init = {
        "name": config.run.name or config.run_label(),
        "group": config.wandb.group or config.run.experiment,
        "job_type": config.wandb.job_type or config.algorithm,
        "dir": str(run_dir),
        "id": wandb_run_id(run_dir),
        "resume": "allow",
        "tags": list(config.wandb.tags) + [config.algorithm, config.model.arch],
    }
    if config.wandb.entity:
        init["entity"] = config.wandb.entity
    values = to_dict(config)
    values["derived"] = {"world_size": accelerator.num_processes, "steps_per_epoch": plan.steps_per_epoch,
                         "total_steps": plan.total_steps, "sources": list(plan.sources),
                         "global_batch": plan.global_forward_batch}
    accelerator.init_trackers(config.wandb.project, config=values, init_kwargs={"wandb": init})
    return Tracking(accelerator, enabled=True)


def mask_overlay_grid(images: torch.Tensor, mask: torch.Tensor, count: int = 8) -> torch.Tensor:
    """uint8 (3, H', W') grid: inputs with muted regions darkened and tinted red.

    A spatial mask shows where features were muted; a channel mask mutes everywhere, so its
    overlay strength is the fraction of channels muted.
    """
    from torchvision.utils import make_grid

    n = min(count, images.shape[0])
    images = images[:n].float().cpu()
    keep = mask[:n].float().mean(dim=1, keepdim=True).cpu()  # (n, 1, h, w) or (n, 1, 1, 1)
    keep = F.interpolate(keep, size=images.shape[-2:], mode="nearest")
    red = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
    shaded = images * (0.4 + 0.6 * keep) + red * 0.4 * (1 - keep)
    return make_grid(shaded.clamp(0, 255).to(torch.uint8), nrow=n, padding=2)


# ---------------------------------------------------------------------------------------------
# Step metrics: accumulated on the device, read (one sync) only when logged


class Meter:
    def __init__(self, accelerator):
        self.accelerator = accelerator
        device = accelerator.device
        self.sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, correct, masked, samples
        self.wait_seconds = 0.0
        self.window_start = time.perf_counter()
        self.train_seconds = 0.0
        self.train_samples = 0
        self.excluded_seconds = 0.0
        self._wait_start = None

    def start_wait(self) -> None:
        self._wait_start = time.perf_counter()

    def end_wait(self) -> None:
        if self._wait_start is not None:
            self.wait_seconds += time.perf_counter() - self._wait_start
            self._wait_start = None

    def update(self, out: dict, inputs) -> None:
        n = inputs.labels.shape[0]
        # torch.full is a fill kernel; torch.tensor(n, device=cuda) would be a blocking copy.
        count = torch.full((), float(n), device=self.sums.device, dtype=torch.float64)
        self.sums += torch.stack([out["loss"].double() * n, out["correct"].double(),
                                  out["masked"].double() * n, count])

    @staticmethod
    def due(step: int, every: int) -> bool:
        return step % every == 0

    def flush(self, optimizer, progress=None) -> dict:
        totals = self.accelerator.reduce(self.sums.clone(), reduction="sum").tolist()
        elapsed = time.perf_counter() - self.window_start - self.excluded_seconds
        loss, correct, masked, samples = totals
        values = {
            "train/loss": loss / max(samples, 1),
            "train/acc": correct / max(samples, 1),
            "train/masked_fraction": masked / max(samples, 1),
            "train/lr": optimizer.param_groups[0]["lr"],
            "perf/img_s": samples / elapsed if elapsed > 0 else 0.0,
            "perf/data_wait_fraction": self.wait_seconds / elapsed if elapsed > 0 else 0.0,
        }
        self.train_seconds += elapsed
        self.train_samples += int(samples)
        if progress is not None:
            progress.set_postfix(loss=f"{values['train/loss']:.3f}", img_s=f"{values['perf/img_s']:.0f}",
                                 wait=f"{values['perf/data_wait_fraction']:.0%}")
        self.sums.zero_()
        self.wait_seconds = 0.0
        self.excluded_seconds = 0.0
        self.window_start = time.perf_counter()
        return values

    def exclude(self, seconds: float) -> None:
        """Keep evaluation and checkpoint time out of the training rate."""
        self.excluded_seconds += seconds

    @property
    def throughput(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds else 0.0


# ---------------------------------------------------------------------------------------------
# Results


def results_document(config: Config, plan, state, meter: Meter) -> dict:
    def pick(evaluation: dict) -> dict:
        return {k: evaluation.get(k) for k in ("step", "val_acc", "target_acc", "target_top5", "val_per_domain")}

    return {
        "config": to_dict(config),
        "algorithm": config.algorithm,
        "dataset": config.data.dataset or plan.manifest.dataset,
        "arch": config.model.arch,
        "targets": list(plan.targets),
        "sources": list(plan.sources),
        "seed": config.run.seed,
        "best": pick(state.best),
        "last": pick(state.last),
        "steps": state.step,
        "throughput_img_s": meter.throughput,
        "history": state.history,
    }


def format_accuracy_table(plan, state) -> str:
    rows = ["| domain | role | accuracy (best val step {}) | accuracy (last step {}) |".format(
        state.best.get("step"), state.last.get("step")), "|---|---|---|---|"]
    for domain in plan.sources:
        best = state.best.get("val_per_domain", {}).get(domain)
        last = state.last.get("val_per_domain", {}).get(domain)
        rows.append(f"| {domain} | source (val) | {_pct(best)} | {_pct(last)} |")
    for domain in plan.targets:
        rows.append(f"| {domain} | target | {_pct(state.best.get('target_acc', {}).get(domain))} "
                    f"| {_pct(state.last.get('target_acc', {}).get(domain))} |")
    return "\n".join(rows)


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f} %"
