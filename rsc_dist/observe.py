"""What a run shows: W&B (or TensorBoard) through Accelerate's trackers, main process only,
offline without an API key; step metrics without per-step host syncs, RSC mask images,
results.json, the per-domain result table and the console accuracy table.

Key layout (docs/wandb.md says how to read it): every metric is plotted against
``trainer/step`` (the trainer's optimizer-independent step; ``trainer/epoch`` beside it);
``train/*`` and ``perf/*`` every ``train.log_every_steps``; at each evaluation ``val/acc``,
``val/acc_mean``, ``val/acc_<source>``, ``target/acc_<target>``, ``target/top5_<target>``, the
domain-independent ``target/acc`` / ``target/top5`` (mean over the target domains) and
``best/val_acc``, ``best/target_acc`` (the target accuracy at the evaluation train.selection
chose so far; ``best/selection`` in the summary names the rule); ``rsc/masks`` images. At the
end: ``results/per_domain`` (table), ``results.json`` (run file) and, with
``wandb.log_model=best``, the best model as an artifact.
"""

from __future__ import annotations

import hashlib
import json
import netrc
import os
import statistics
import subprocess
import time
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F

from rsc_dist import selection
from rsc_dist.config import Config, to_dict, trajectory_fingerprint
from rsc_dist.contracts import RESULTS_SCHEMA_VERSION

REPO_ROOT = Path(__file__).resolve().parent.parent
STEP_KEY = "trainer/step"
EPOCH_KEY = "trainer/epoch"
TABLE_KEY = "results/per_domain"
TABLE_COLUMNS = ["domain", "role", "n", "best_top1", "best_top5", "last_top1", "last_top5",
                 "best_step", "last_step"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# (glob or key, summary). Every key is plotted against trainer/step; specific keys first.
METRIC_SUMMARIES = (
    ("train/loss", "min,last"),
    ("train/acc", "max,last"),
    ("train/lr", "last"),
    ("train/masked_fraction", "mean,last"),
    ("perf/img_s", "mean,last"),
    ("perf/data_wait_fraction", "mean,last"),
    ("val/*", "max,last"),
    ("target/*", "max,last"),
    ("best/*", "last"),
    ("train/*", "last"),
    ("perf/*", "last"),
    ("rsc/*", None),
)


# ---------------------------------------------------------------------------------------------
# W&B / tracker selection and run identity


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
    """What to pass as Accelerator(log_with=...): "wandb", "tensorboard" or None (console only).

    train.tracker=wandb with W&B disabled (wandb.mode=disabled or WANDB_MODE=disabled) is None.
    """
    tracker = config.train.tracker
    if tracker == "tensorboard":
        return "tensorboard"
    if tracker == "none" or wandb_mode(config) == "disabled":
        return None
    return "wandb"


def wandb_run_id(run_dir: Path) -> str:
    """Stable per run folder, so a requeued or resumed job continues the same W&B run.

    WANDB_RUN_ID (set by `wandb agent` for a sweep trial) wins; otherwise the id a previous
    start of this run folder recorded in RUN/wandb/run_id (so a sweep trial resumed outside
    the agent continues its sweep run); otherwise a hash of the folder.
    """
    env = os.environ.get("WANDB_RUN_ID")
    if env:
        return env
    try:
        stored = (Path(run_dir) / "wandb" / "run_id").read_text().strip()
    except OSError:
        stored = ""
    return stored or hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]


def _remember_run_id(run_dir: Path, run_id: str) -> None:
    try:
        path = Path(run_dir) / "wandb" / "run_id"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    except OSError:
        pass


@lru_cache(maxsize=None)
def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """HEAD of the checkout the code runs from; None outside git (never raises)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) >= 7 else None


def dataset_name(config: Config, plan) -> str:
    return config.data.dataset or plan.manifest.dataset


def run_tags(config: Config, plan) -> list[str]:
    """User tags, then dataset, target:<domain> per target, arch, algorithm (deduplicated,
    W&B's 64-character limit)."""
    tags = list(config.wandb.tags) + [dataset_name(config, plan)]
    tags += [f"target:{t}" for t in plan.targets] + [config.model.arch, config.algorithm]
    seen = []
    for tag in tags:
        tag = str(tag)[:64]
        if tag and tag not in seen:
            seen.append(tag)
    return seen


def run_config(config: Config, plan, accelerator) -> dict:
    """The W&B run config: the resolved config, the git commit, the fingerprint, derived sizes."""
    values = to_dict(config)
    values["git_commit"] = git_commit()
    values["fingerprint"] = trajectory_fingerprint(config, accelerator.num_processes)
    values["derived"] = {"world_size": accelerator.num_processes, "steps_per_epoch": plan.steps_per_epoch,
                         "total_steps": plan.total_steps, "sources": list(plan.sources),
                         "targets": list(plan.targets), "dataset": dataset_name(config, plan),
                         "num_classes": len(plan.manifest.classes),
                         "global_batch": plan.global_batch, "global_forward_batch": plan.global_forward_batch}
    return values


def _flat_hparams(tree: dict, prefix: str = "") -> dict:
    """TensorBoard's hparams take scalars and strings only."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


# ---------------------------------------------------------------------------------------------
# Tracking: what the training loop calls


def mean_or_none(values) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def evaluation_metrics(evaluation: dict, best: dict | None = None) -> dict:
    """The scalars logged at one evaluation (best: the best evaluation so far, this one included)."""
    values = {}
    if evaluation.get("val_acc") is not None:
        values["val/acc"] = evaluation["val_acc"]
    if evaluation.get("val_acc_mean") is not None:
        values["val/acc_mean"] = evaluation["val_acc_mean"]
    values.update({f"val/acc_{d}": a for d, a in evaluation.get("val_per_domain", {}).items()})
    target_acc, target_top5 = evaluation.get("target_acc", {}), evaluation.get("target_top5", {})
    values.update({f"target/acc_{d}": a for d, a in target_acc.items()})
    values.update({f"target/top5_{d}": a for d, a in target_top5.items()})
    for key, per_domain in (("target/acc", target_acc), ("target/top5", target_top5)):
        if per_domain:
            values[key] = mean_or_none(per_domain.values())
    if best:
        for key in ("val_acc", "val_acc_mean"):
            if best.get(key) is not None:
                values[f"best/{key}"] = best[key]
        if best.get("target_acc"):
            values["best/target_acc"] = mean_or_none(best["target_acc"].values())
            values.update({f"best/target_acc_{d}": a for d, a in best["target_acc"].items()})
        if best.get("step") is not None:
            values["best/step"] = best["step"]
    return values


def per_domain_rows(results: dict) -> list[list]:
    """The per-domain result table (TABLE_COLUMNS): source domains (their validation split),
    the pooled and the mean source validation, each target, and the mean over targets. n is
    the number of samples behind the row (the last evaluation's; evaluations count the same
    samples)."""
    best, last = results.get("best") or {}, results.get("last") or {}

    def counts(key: str) -> dict:
        return last.get(key) or best.get(key) or {}

    val_n, target_n = counts("val_n"), counts("target_n")
    steps = [best.get("step"), last.get("step")]
    rows = []
    for domain in results.get("sources", []):
        rows.append([domain, "source-val", val_n.get(domain),
                     (best.get("val_per_domain") or {}).get(domain), None,
                     (last.get("val_per_domain") or {}).get(domain), None, *steps])
    sources_n = sum(val_n.values()) if val_n else None
    for key, role in (("val_acc", "source-val (pooled)"), ("val_acc_mean", "source-val (mean)")):
        if best.get(key) is not None or last.get(key) is not None:
            rows.append(["all sources", role, sources_n, best.get(key), None, last.get(key), None, *steps])
    targets = list(results.get("targets", []))
    for domain in targets:
        rows.append([domain, "target", target_n.get(domain),
                     (best.get("target_acc") or {}).get(domain), (best.get("target_top5") or {}).get(domain),
                     (last.get("target_acc") or {}).get(domain), (last.get("target_top5") or {}).get(domain),
                     *steps])
    if targets:
        def avg(evaluation, key):
            values = [(evaluation.get(key) or {}).get(d) for d in targets]
            return mean_or_none(v for v in values if v is not None) if None not in values else None

        total = sum(target_n.get(d, 0) for d in targets) if all(d in target_n for d in targets) else None
        rows.append(["mean over targets", "target (mean)", total, avg(best, "target_acc"),
                     avg(best, "target_top5"), avg(last, "target_acc"), avg(last, "target_top5"), *steps])
    return rows


def rows_markdown(rows: list[list]) -> str:
    def cell(value):
        if value is None:
            return "—"
        return f"{100 * value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mask_caption(step: int, mode: str, labels=None, class_names=(), selected=None) -> str:
    """First line: step and mask mode; then one line per grid column (left to right):
    the sample's class and whether RSC selected it (its mask mutes something)."""
    lines = [f"step {step}, {mode} mask (red = muted); columns left to right:"]
    n = len(selected) if selected is not None else (len(labels) if labels is not None else 0)
    for i in range(n):
        name = "?"
        if labels is not None:
            label = int(labels[i])
            name = class_names[label] if 0 <= label < len(class_names) else f"class {label}"
        picked = "" if selected is None else (" selected" if selected[i] else " not selected")
        lines.append(f"{i + 1}: {name}{picked}")
    return "\n".join(lines)


class Tracking:
    """The loop's handle on the tracker: W&B, TensorBoard, or none (console only).

    All methods are safe to call on every rank; only the main process writes.
    """

    def __init__(self, accelerator, kind: str | None = None, *, config: Config | None = None,
                 run_dir: Path | None = None, steps_per_epoch: int | None = None):
        self.accelerator = accelerator
        self.kind = kind or None
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.steps_per_epoch = steps_per_epoch
        self.best: dict | None = None
        self.last_step = 0

    @property
    def enabled(self) -> bool:
        return self.kind is not None

    @property
    def writes(self) -> bool:
        return self.kind is not None and self.accelerator.is_main_process

    def _run(self):
        return self.accelerator.get_tracker(self.kind, unwrap=True) if self.writes else None

    # -- during training ------------------------------------------------------------------------

    def log(self, values: dict, step: int) -> None:
        if not self.writes:
            return
        values = dict(values)
        if self.kind == "wandb":
            values[STEP_KEY] = step
            if self.steps_per_epoch:
                values[EPOCH_KEY] = step / self.steps_per_epoch
        self.last_step = max(self.last_step, step)
        self.accelerator.log(values, step=step)

    def log_evaluation(self, evaluation: dict, step: int, best: dict | None = None) -> None:
        """best: the best evaluation so far (TrainState.best after record_evaluation), which
        survives a resume; without it the best since this process started is used."""
        if best is None:
            if selection.replaces(self.selection, evaluation, self.best):
                self.best = evaluation
            best = self.best
        else:
            self.best = best
        values = evaluation_metrics(evaluation, best)
        self.log(values, step)
        shown = {k: v for k, v in values.items() if k != "best/step"}
        line = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
        self.accelerator.print(f"step {step}: {line} (best by {self.selection})")

    @property
    def selection(self) -> str:
        """The rule that picks best/* (train.selection)."""
        return self.config.train.selection if self.config is not None else Config().train.selection

    def log_masks(self, images: torch.Tensor, mask: torch.Tensor | None, mode: str, step: int,
                  labels: torch.Tensor | None = None, class_names: tuple = (), count: int = 8) -> None:
        if not self.writes or mask is None:
            return
        n = min(count, images.shape[0])
        grid = mask_overlay_grid(images, mask, count=n)
        selected = mask[:n].detach().eq(0).flatten(1).any(dim=1).cpu().tolist()
        label_list = labels[:n].detach().cpu().tolist() if labels is not None else None
        caption = mask_caption(step, mode, label_list, tuple(class_names), selected)
        self.last_step = max(self.last_step, step)
        run = self._run()
        if self.kind == "wandb":
            import wandb

            run.log({"rsc/masks": wandb.Image(grid.permute(1, 2, 0).numpy(), caption=caption),
                     "rsc/grid_selected_fraction": sum(selected) / max(n, 1), STEP_KEY: step},
                    step=step)
        elif self.kind == "tensorboard":
            run.add_image("rsc/masks", grid, global_step=step, dataformats="CHW")
            run.add_text("rsc/masks_caption", caption.replace("\n", "  \n"), global_step=step)
            run.add_scalar("rsc/grid_selected_fraction", sum(selected) / max(n, 1), global_step=step)
            run.flush()

    # -- at the end -----------------------------------------------------------------------------

    def finish_run(self, results: dict, run_dir: Path | None = None) -> None:
        """Summary keys, the per-domain table, results.json as a run file and (wandb.log_model=
        best) the best model artifact. Call on every rank before accelerator.end_training()."""
        if not self.writes:
            return
        run_dir = Path(run_dir) if run_dir is not None else self.run_dir
        step = max(self.last_step, int(results.get("steps") or 0))
        summary = summary_values(results)
        rows = per_domain_rows(results)
        run = self._run()
        if self.kind == "wandb":
            self._finish_wandb(run, results, run_dir, step, summary, rows)
        elif self.kind == "tensorboard":
            for key, value in summary.items():
                if isinstance(value, (int, float)):
                    run.add_scalar(key, value, global_step=step)
            run.add_text(TABLE_KEY, rows_markdown(rows), global_step=step)
            run.flush()

    def _finish_wandb(self, run, results, run_dir, step, summary, rows) -> None:
        import wandb

        table = wandb.Table(columns=TABLE_COLUMNS, data=rows)
        run.log({TABLE_KEY: table, STEP_KEY: step}, step=step)
        for key, value in summary.items():
            run.summary[key] = value
        if run_dir is not None and (run_dir / "results.json").is_file():
            run.save(str(run_dir / "results.json"), base_path=str(run_dir), policy="now")
        if self.config is not None and self.config.wandb.log_model == "best" and run_dir is not None:
            artifact = best_model_artifact(run, results, run_dir)
            if artifact is None:
                self.accelerator.print(f"wandb.log_model=best: no model weights in {run_dir / 'checkpoints' / 'best'}; "
                                       "no model artifact logged")
            else:
                best_step = (results.get("best") or {}).get("step")
                aliases = ["best"] + ([f"step-{best_step}"] if best_step is not None else [])
                run.log_artifact(artifact, aliases=aliases)

    def log_summary(self, results: dict) -> None:
        """Deprecated name of finish_run (before the loop passes run_dir)."""
        self.finish_run(results, self.run_dir)


def summary_values(results: dict) -> dict:
    """Domain-independent and per-domain end-of-run keys (W&B summary, TensorBoard scalars)."""
    values = {}
    for key in ("best", "last"):
        block = results.get(key) or {}
        if block.get("val_acc") is not None:
            values[f"{key}/val_acc"] = block["val_acc"]
        accs = block.get("target_acc") or {}
        if accs:
            values[f"{key}/target_acc"] = mean_or_none(accs.values())
        for domain, acc in accs.items():
            values[f"{key}/target_acc_{domain}"] = acc
        top5 = block.get("target_top5") or {}
        if top5:
            values[f"{key}/target_top5"] = mean_or_none(top5.values())
        if block.get("step") is not None:
            values[f"{key}/step"] = block["step"]
    if results.get("selection"):
        values["best/selection"] = results["selection"]  # which rule chose the best/* values
    for key in ("steps", "throughput_img_s", "fingerprint"):
        if results.get(key) is not None:
            values[f"run/{key}"] = results[key]
    return values


def best_model_files(run_dir: Path) -> list[Path]:
    """The model weights in RUN/checkpoints/best (model*.safetensors, pytorch_model*.bin, ...),
    not the optimizer/scheduler/RNG state saved beside them."""
    folder = Path(run_dir) / "checkpoints" / "best"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
                  and p.name.startswith(("model", "pytorch_model")))


def best_model_artifact(run, results: dict, run_dir: Path):
    """A wandb.Artifact of type "model" with the best weights, metadata = the best evaluation."""
    import wandb

    files = best_model_files(run_dir)
    if not files:
        return None
    best = results.get("best") or {}
    metadata = {"step": best.get("step"), "val_acc": best.get("val_acc"),
                "target_acc": best.get("target_acc"), "target_top5": best.get("target_top5"),
                "val_per_domain": best.get("val_per_domain"),
                "target_acc_mean": mean_or_none((best.get("target_acc") or {}).values()),
                "algorithm": results.get("algorithm"), "dataset": results.get("dataset"),
                "arch": results.get("arch"), "targets": results.get("targets"), "seed": results.get("seed"),
                "fingerprint": results.get("fingerprint")}
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"model-{run.id}")
    artifact = wandb.Artifact(safe, type="model", metadata=metadata,
                              description=f"step {best.get('step')} of run {run.name}, chosen by "
                                          f"{results.get('selection')}")
    folder = Path(run_dir) / "checkpoints" / "best"
    for path in files:
        artifact.add_file(str(path), name=str(path.relative_to(folder)))
    config_file = Path(run_dir) / "config.yaml"
    if config_file.is_file():
        artifact.add_file(str(config_file), name="config.yaml")
    return artifact


def define_metrics(run) -> None:
    """trainer/step as the x axis of every key, epoch beside it, summaries that mean something."""
    run.define_metric(STEP_KEY, summary="max")
    run.define_metric(EPOCH_KEY, step_metric=STEP_KEY, summary="last")
    for name, summary in METRIC_SUMMARIES:
        kwargs = {"summary": summary} if summary else {}
        run.define_metric(name, step_metric=STEP_KEY, **kwargs)


def start_tracking(accelerator, config: Config, run_dir: Path, plan) -> Tracking:
    """Start the tracker the Accelerator was made with (log_with=tracker_name(config),
    project_dir=run_dir). Call on every rank."""
    run_dir = Path(run_dir)
    kind = tracker_name(config)
    made_with = sorted(str(getattr(t, "value", t)) for t in getattr(accelerator, "log_with", None) or [])
    if kind is not None and kind not in made_with:
        raise ValueError(f"the Accelerator was made with log_with={made_with} but the config selects "
                         f"{kind!r}; pass log_with=observe.tracker_name(config)")
    tracking = Tracking(accelerator, kind, config=config, run_dir=run_dir,
                        steps_per_epoch=plan.steps_per_epoch)
    if kind is None:
        return tracking
    values = run_config(config, plan, accelerator)
    if kind == "tensorboard":
        accelerator.init_trackers("tensorboard", config=_flat_hparams(values))
        return tracking
    mode = wandb_mode(config)
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    run_id = wandb_run_id(run_dir)
    init = {
        "name": config.run.name or config.run_label(),
        "group": config.wandb.group or config.run.experiment,
        "job_type": config.wandb.job_type or config.algorithm,
        "dir": str(run_dir),
        "id": run_id,
        "resume": "allow",
        "tags": run_tags(config, plan),
    }
    if config.wandb.entity:
        init["entity"] = config.wandb.entity
    if accelerator.is_main_process:
        _remember_run_id(run_dir, run_id)
    accelerator.init_trackers(config.wandb.project, config=values, init_kwargs={"wandb": init})
    if accelerator.is_main_process:
        define_metrics(accelerator.get_tracker("wandb", unwrap=True))
    return tracking


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
    def __init__(self, accelerator, metrics: tuple[str, ...] = ()):
        """``metrics``: the method's per-step metrics (rsc_dist.methods), logged as train/NAME."""
        self.accelerator = accelerator
        self.metrics = tuple(metrics)
        device = accelerator.device
        # loss, correct, samples, then each method metric (sample-weighted)
        self.sums = torch.zeros(3 + len(self.metrics), device=device, dtype=torch.float64)
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
        self.sums += torch.stack([out["loss"].double() * n, out["correct"].double(), count]
                                 + [out["metrics"][name].double() * n for name in self.metrics])

    @staticmethod
    def due(step: int, every: int) -> bool:
        return step % every == 0

    def flush(self, optimizer, progress=None) -> dict:
        totals = self.accelerator.reduce(self.sums.clone(), reduction="sum").tolist()
        elapsed = time.perf_counter() - self.window_start - self.excluded_seconds
        loss, correct, samples, *metric_sums = totals
        values = {
            "train/loss": loss / max(samples, 1),
            "train/acc": correct / max(samples, 1),
            **{f"train/{name}": total / max(samples, 1) for name, total in zip(self.metrics, metric_sums)},
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


def results_document(config: Config, plan, state, meter: Meter, run_dir: Path | None = None) -> dict:
    """RUN/results.json (layout: rsc_dist/contracts.py, RESULTS_LAYOUT); run_dir decides
    best_checkpoint."""
    best_checkpoint = None
    if run_dir is not None and (Path(run_dir) / "checkpoints" / "best").is_dir():
        best_checkpoint = "checkpoints/best"
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "config": to_dict(config),
        "fingerprint": trajectory_fingerprint(config, plan.world_size),
        "algorithm": config.algorithm,
        "dataset": config.data.dataset or plan.manifest.dataset,
        "arch": config.model.arch,
        "seed": config.run.seed,
        "targets": list(plan.targets),
        "sources": list(plan.sources),
        "selection": config.train.selection,
        "best": state.best or None,
        "last": state.last,
        "best_checkpoint": best_checkpoint,
        "steps": state.step,
        "throughput_img_s": float(meter.throughput),
        "history": state.history,
        "forced_resumes": state.forced_resumes,
    }


def format_accuracy_table(plan, state) -> str:
    rule = plan.config.train.selection
    rows = [f"| domain | role | accuracy (best by {rule}: step {state.best.get('step')}) "
            f"| accuracy (last step {state.last.get('step')}) |", "|---|---|---|---|"]
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
