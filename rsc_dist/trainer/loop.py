"""The training loop: steps, periodic evaluation and checkpoints, and the stop agreement.

Everything that decides what a step computes is a pure function of the step number (data
position, the method's draws such as RSC's mode and p_batch, learning rate), so a resumed loop
repeats an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from rsc_dist.config import Config, to_dict
from rsc_dist.core.contracts import CHECKPOINTS_DIR, EXIT_NONFINITE, EXIT_OK, EXIT_PREEMPTED
from rsc_dist.data.streams import DevicePrefetch, make_loader
from rsc_dist.observe.meter import Meter
from rsc_dist.observe.tracking import Tracking
from rsc_dist.trainer import averaged, build, checkpoints
from rsc_dist.trainer.evaluation import evaluate, summarize_evaluation
from rsc_dist.trainer.plan import DataPlan
from rsc_dist.trainer.state import TrainState
from rsc_dist.trainer.step import Trainables, train_on_batch
from rsc_dist.trainer.stopping import StopFlags


@dataclass
class Run:
    """What the loop works with (assembled by rsc_dist.train)."""

    config: Config
    plan: DataPlan
    run_dir: Path
    accelerator: object
    trainables: Trainables  # the prepared model, the network in it, optimizer, schedule, method
    state: TrainState
    stop: StopFlags
    tracking: Tracking


def train(run: Run) -> tuple[int, Meter]:
    """Train from ``run.state.step`` to the plan's last step; the exit code and the meter."""
    config, plan, state, accelerator = run.config, run.plan, run.state, run.accelerator
    rank = accelerator.process_index
    pin = accelerator.device.type == "cuda"
    eval_loaders = plan.eval_loaders(rank, pin)
    stream = plan.train_stream(rank, accelerator.device.type)
    meter = Meter(accelerator, run.trainables.method.metrics)
    progress = tqdm(total=plan.total_steps, initial=state.step, disable=not accelerator.is_main_process,
                    desc=f"{config.algorithm} {'+'.join(plan.targets)}", dynamic_ncols=True)
    exit_code = EXIT_OK
    while state.step < plan.total_steps and exit_code == EXIT_OK and not averaged.stops_early(run):
        epoch, in_epoch = divmod(state.step, plan.steps_per_epoch)
        stream.set_position(epoch, in_epoch)
        loader = make_loader(stream, config.data.workers, pin)
        meter.start_wait()
        # Device-path batches: batch i+1's decode + augmentation are issued before step i runs.
        for batch in DevicePrefetch(loader, accelerator.device):
            meter.end_wait()
            step = state.step
            if batch["step"] != step - epoch * plan.steps_per_epoch:  # a broken stream, not user error
                raise RuntimeError(f"data stream out of order: batch {batch['step']} at step {step}")
            out, inputs = _train_step(run, batch, step)
            meter.update(out, inputs)
            state.step += 1
            progress.update(1)
            if state.step == config.train.stop_at_step:
                run.stop.request(f"train.stop_at_step={state.step}")
            if meter.due(state.step, config.train.log_every_steps):
                run.tracking.log(meter.flush(run.trainables.optimizer, progress), state.step)
            if (config.train.image_log_every_steps and step % config.train.image_log_every_steps == 0
                    and out["mask"] is not None):
                run.tracking.log_masks(inputs.pixels, out["mask"], out["mask_mode"], state.step,
                                       labels=batch["label"], class_names=plan.manifest.classes,
                                       key=config.algorithm)
            exit_code = _between_steps(run, meter, eval_loaders)
            end_of_epoch = state.step % plan.steps_per_epoch == 0
            if exit_code != EXIT_OK or state.step >= plan.total_steps or end_of_epoch or averaged.stops_early(run):
                break
            meter.start_wait()
        del loader
    meter.close()
    progress.close()
    return exit_code, meter


def _train_step(run: Run, batch: dict, step: int):
    out, inputs = train_on_batch(run.accelerator, run.trainables, run.config, batch, step, run.plan.steps_per_epoch)
    run.stop.track_loss(out["loss"])
    return out, inputs


def _between_steps(run: Run, meter: Meter, eval_loaders: dict) -> int:
    """Evaluate, checkpoint and agree on stopping when due; the exit code so far."""
    config, plan, state, accelerator = run.config, run.plan, run.state, run.accelerator
    end_of_epoch = state.step % plan.steps_per_epoch == 0 or state.step == plan.total_steps
    last_step = state.step == plan.total_steps
    evaluate_now = last_step or _due(state.step, config.train.eval_every_steps, end_of_epoch)
    checkpoint_now = last_step or _due(state.step, config.train.checkpoint_every_steps, end_of_epoch)
    # Every rank takes this branch at the same steps (a pure function of the step), so the
    # collectives inside never wait for a rank that skipped them.
    if not (evaluate_now or checkpoint_now or state.step == config.train.stop_at_step
            or state.step % config.train.agree_every_steps == 0):
        return EXIT_OK
    pause_start = time.perf_counter()
    signalled, nonfinite = run.stop.agree(accelerator)
    if nonfinite:
        accelerator.print(f"non-finite loss before step {state.step}: stopping; the last good "
                          f"checkpoint in {run.run_dir / CHECKPOINTS_DIR} is kept")
        return EXIT_NONFINITE
    stops_here = False
    if evaluate_now:
        evaluated = build.evaluation_model(config, plan.manifest.num_classes, accelerator, run.trainables.model)
        counts = evaluate(accelerator, evaluated, eval_loaders, config, len(plan.domains))
        del evaluated
        evaluation = summarize_evaluation(counts, plan.domains, state.step, plan.sources, plan.targets)
        if state.record_evaluation(evaluation, config.train.selection):  # the new best; every rank
            checkpoints.save_best(accelerator, run.trainables.model, run.run_dir, evaluation, to_dict(config))
        run.tracking.log_evaluation(evaluation, state.step, best=state.best)
        # The weight average: its evaluation (EMA, SWA) or SWAD's segment, and SWAD's early stop.
        stops_here = averaged.at_evaluation(run, evaluation, eval_loaders)
    last_step = last_step or stops_here
    if checkpoint_now or signalled or stops_here:
        state.reach(state.step)  # the segment's end as this checkpoint records it
        checkpoints.save_checkpoint(accelerator, run.run_dir, state.step, config.train.keep_checkpoints)
    meter.exclude(time.perf_counter() - pause_start)
    # A stop that arrives with the last step done has nothing left to save for: the run ends as
    # finished (results.json, exit 0) instead of asking the launcher to requeue a complete run.
    if signalled and not last_step:
        checkpoints.mark_preempted(accelerator, run.run_dir, state.step, run.stop.signalled)
        # No rank exits before the marker exists: a launcher that sees one rank end (srun
        # --kill-on-bad-exit) may signal the others, and the job script reads the marker.
        accelerator.wait_for_everyone()
        accelerator.print(f"stop requested: saved step {state.step}; resume with --resume auto")
        return EXIT_PREEMPTED
    return EXIT_OK


def _due(step: int, every: int | None, end_of_epoch: bool) -> bool:
    return step % every == 0 if every else end_of_epoch
