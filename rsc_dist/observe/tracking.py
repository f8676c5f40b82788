"""The training loop's handle on the tracker (W&B or TensorBoard through Accelerate, main
process only, offline without an API key): start it, log steps, evaluations and mask images,
and finish the run with its summary, table, results file and model artifact."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rsc_dist.config import Config
from rsc_dist.core import selection
from rsc_dist.core.contracts import BEST_RELATIVE, RESULTS_FILE
from rsc_dist.observe.artifacts import best_model_artifact
from rsc_dist.observe.identity import (
    remember_run_id,
    run_config,
    run_tags,
    tensorboard_hparams,
    tracker_name,
    wandb_mode,
    wandb_run_id,
)
from rsc_dist.observe.masks import mask_caption, mask_overlay_grid
from rsc_dist.observe.metrics import (
    AVERAGED_PREFIX,
    EPOCH_KEY,
    SELECTION_SCORE_KEY,
    STEP_KEY,
    TABLE_COLUMNS,
    TABLE_KEY,
    define_metrics,
    evaluation_metrics,
    per_domain_rows,
    rows_markdown,
    summary_values,
)


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
        chosen_score = selection.trial_score(self.selection, best) if best else None
        if chosen_score is not None:
            # What a sweep compares runs by (the W&B sweep's metric): source validation, never the target.
            values[SELECTION_SCORE_KEY] = chosen_score
        self.log(values, step)
        shown = {k: v for k, v in values.items() if k != "best/step"}
        line = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
        self.accelerator.print(f"step {step}: {line} (best by {self.selection})")

    def log_averaged_evaluation(self, evaluation: dict, step: int, best: dict | None, label: str) -> None:
        """An evaluation of the averaged model (train.averaging): the same keys as the trained
        model's under ``averaged/`` (``averaged/target/acc``, ``averaged/best/target_acc``, ...)."""
        values = {f"{AVERAGED_PREFIX}{k}": v for k, v in evaluation_metrics(evaluation, best).items()}
        self.log(values, step)
        shown = {k.removeprefix(AVERAGED_PREFIX): v for k, v in values.items() if not k.endswith("best/step")}
        line = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
        self.accelerator.print(f"step {step}: {label} (averaged weights): {line}")

    @property
    def selection(self) -> str:
        """The rule that picks best/* (train.selection)."""
        return self.config.train.selection if self.config is not None else Config().train.selection

    def log_masks(self, images: torch.Tensor, mask: torch.Tensor | None, mode: str, step: int,
                  labels: torch.Tensor | None = None, class_names: tuple = (), count: int = 8,
                  key: str = "rsc") -> None:
        """The inputs with a method's feature mask drawn over them, as ``KEY/masks`` (the method's
        name: ``rsc/masks``), with the fraction of the grid's samples the mask mutes."""
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

            run.log({f"{key}/masks": wandb.Image(grid.permute(1, 2, 0).numpy(), caption=caption),
                     f"{key}/grid_selected_fraction": sum(selected) / max(n, 1), STEP_KEY: step},
                    step=step)
        elif self.kind == "tensorboard":
            run.add_image(f"{key}/masks", grid, global_step=step, dataformats="CHW")
            run.add_text(f"{key}/masks_caption", caption.replace("\n", "  \n"), global_step=step)
            run.add_scalar(f"{key}/grid_selected_fraction", sum(selected) / max(n, 1), global_step=step)
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
        if results.get("provenance"):  # the run's end and every segment, as results.json has them
            run.config.update({"provenance": results["provenance"]}, allow_val_change=True)
        if run_dir is not None and (run_dir / RESULTS_FILE).is_file():
            run.save(str(run_dir / RESULTS_FILE), base_path=str(run_dir), policy="now")
        if self.config is not None and self.config.wandb.log_model == "best" and run_dir is not None:
            artifact = best_model_artifact(run, results, run_dir)
            if artifact is None:
                self.accelerator.print(f"wandb.log_model=best: no model weights in {run_dir / BEST_RELATIVE}; "
                                       "no model artifact logged")
            else:
                best_step = (results.get("best") or {}).get("step")
                aliases = ["best"] + ([f"step-{best_step}"] if best_step is not None else [])
                run.log_artifact(artifact, aliases=aliases)


def start_tracking(accelerator, config: Config, run_dir: Path, plan, provenance: dict | None = None) -> Tracking:
    """Start the tracker the Accelerator was made with (log_with=tracker_name(config),
    project_dir=run_dir), its run config carrying ``provenance`` (rsc_dist.observe.provenance).
    Call on every rank."""
    run_dir = Path(run_dir)
    kind = tracker_name(config)
    made_with = sorted(str(getattr(t, "value", t)) for t in getattr(accelerator, "log_with", None) or [])
    if kind is not None and kind not in made_with:
        raise ValueError(f"the Accelerator was made with log_with={made_with} but the config selects "
                         f"{kind!r}; pass log_with=rsc_dist.observe.identity.tracker_name(config)")
    tracking = Tracking(accelerator, kind, config=config, run_dir=run_dir,
                        steps_per_epoch=plan.steps_per_epoch)
    if kind is None:
        return tracking
    values = run_config(config, plan, accelerator, provenance)
    if kind == "tensorboard":
        accelerator.init_trackers("tensorboard", config=tensorboard_hparams(values))
        return tracking
    mode = wandb_mode(config)
    os.environ["WANDB_MODE"] = mode  # also replaces an empty or invalid WANDB_MODE W&B would reject
    os.environ.setdefault("WANDB_SILENT", "true")
    run_id = wandb_run_id(run_dir)
    init = {
        # W&B reads its environment once per process: after an earlier wandb.init in this
        # process only this argument sets the mode.
        "mode": mode,
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
        remember_run_id(run_dir, run_id)
    accelerator.init_trackers(config.wandb.project, config=values, init_kwargs={"wandb": init})
    if accelerator.is_main_process:
        define_metrics(accelerator.get_tracker("wandb", unwrap=True))
    return tracking
