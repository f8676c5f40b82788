"""A training run from a resolved config: plan the data, assemble the model, optimizer and method,
resume when a checkpoint exists, train (rsc_dist.trainer.loop), write results.json and print the
accuracy table. ``rsc_dist/train.py`` parses the command line and calls ``run``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate.utils import set_seed

from rsc_dist import methods
from rsc_dist.config import EARLIER_DEFAULTS, Config, flatten, save_config, to_dict, trajectory_settings
from rsc_dist.core import protocols, selection
from rsc_dist.core.contracts import CONFIG_FILE, EXIT_OK, PREEMPTED_MARKER, RESULTS_FILE
from rsc_dist.core.errors import ConfigError
from rsc_dist.data.streams import start_worker_server
from rsc_dist.observe import provenance
from rsc_dist.observe.report import format_accuracy_table, results_document
from rsc_dist.observe.tracking import start_tracking
from rsc_dist.trainer import averaged, build, checkpoints, loop
from rsc_dist.trainer.plan import DataPlan, data_root
from rsc_dist.trainer.state import TrainState
from rsc_dist.trainer.stopping import StopFlags


def run(config: Config, resume: str = "auto") -> int:
    """Train ``config`` on the ranks the launcher started; the exit code (rsc_dist.core.contracts)."""
    # The run folder is needed to make the Accelerator (its project_dir), so the number of
    # processes comes from the launcher's environment (make_accelerator checks the group has it).
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    run_dir = config.resolved_output_dir(world_size).resolve()
    threads = torch.get_num_threads()
    try:
        accelerator = build.make_accelerator(config, run_dir)  # sets this rank's CPU threads
        with checkpoints.lock_run(accelerator, run_dir):  # one trainer per run folder
            return _run(config, resume, run_dir, accelerator)
    finally:  # a caller in the same process (a test, a notebook) keeps its own count
        torch.set_num_threads(threads)


def _run(config: Config, resume: str, run_dir: Path, accelerator) -> int:
    # Installed right after the Accelerator exists: a stop requested during setup is honoured
    # at the first agreement step instead of killing the process with the default action.
    stop = StopFlags(accelerator.device)
    stop.install()
    set_seed(config.run.seed)
    protocols.check_world_size(config.run.protocol, flatten(to_dict(config)), accelerator.num_processes)
    plan = DataPlan(config, data_root(config, accelerator.main_process_first), accelerator.num_processes)
    check_selection_data(config, plan)
    averaged.check_averaging_data(config, plan)
    if config.data.workers > 0:
        start_worker_server()  # its imports overlap the model's construction

    trainables = build.training_objects(config, plan, accelerator)
    state = TrainState(data_order=plan.data_order(), settings=trajectory_settings(config))
    # The weight average's state (whole tensors, its rule and records) is the third custom state.
    accelerator.register_for_checkpointing(trainables.scheduler, state,
                                           *([trainables.averaging] if trainables.averaging is not None else []))
    resume_from(accelerator, state, run_dir, resume)
    ranks = provenance.gather_rank_facts(accelerator)
    state.segments.append(provenance.new_segment(state.step, ranks))
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / CONFIG_FILE)
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)  # this run continues a preempted one

    threads_rule = build.cpu_threads(config)[1] if accelerator.device.type == "cpu" else "torch's default (GPU run)"
    tracking = start_tracking(accelerator, config, run_dir, plan,
                              provenance=provenance.provenance_record(ranks, state.segments, threads_rule))
    # On the CPU the intra-op thread count changes how kernels split their float sums, so runs
    # with other counts part ways: the start line says how many and why (build.cpu_threads).
    threads = f" x {torch.get_num_threads()} thread(s)" if accelerator.device.type == "cpu" else ""
    why = f" ({threads_rule})" if accelerator.device.type == "cpu" else ""
    accelerator.print(
        f"run folder {run_dir}\n{accelerator.num_processes} process(es){threads} on {accelerator.device}{why}, "
        f"sources {list(plan.sources)}, targets {list(plan.targets)}; {plan.steps_per_epoch} steps/epoch, "
        f"{plan.total_steps} steps, global batch {plan.global_batch} samples "
        f"({plan.global_forward_batch} images per step)"
        + (f"; {trainables.network.loaded_from}" if trainables.network.loaded_from else "")
        + (f"; averaging {config.train.averaging}" if trainables.averaging is not None else ""))
    first_step = state.step
    the_run = loop.Run(config, plan, run_dir, accelerator, trainables, state, stop, tracking)
    exit_code, meter = loop.train(the_run)
    if exit_code == EXIT_OK:
        resumed_finished = state.step == first_step
        if not (resumed_finished and (run_dir / RESULTS_FILE).exists()):
            averaged.finish(the_run, plan.eval_loaders(accelerator.process_index, accelerator.device.type == "cuda"))
        state.reach(state.step)
        report(accelerator, config, plan, state, meter, tracking, run_dir, resumed_finished=resumed_finished,
               provenance=provenance.provenance_record(ranks, state.segments, threads_rule, provenance.now()),
               trainables=trainables)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return exit_code


def check_selection_data(config: Config, plan: DataPlan) -> None:
    """A rule that ranks evaluations by source validation accuracy cannot choose "best" when a
    source domain has no validation sample: refuse before training, not after."""
    rule = config.train.selection
    if rule not in selection.NEEDS_SOURCE_VAL:
        return
    empty = selection.sources_without_validation(plan.validation_counts())
    if empty:
        where = ("data.holdout_fraction leaves them" if plan.holdout else
                 f"{plan.manifest.root}/_info.json has")
        raise ConfigError(f"train.selection={rule} needs source validation data, but source domain(s) "
                          f"{', '.join(empty)} have 0 val samples ({where} none); reconvert with a validation split, "
                          "set data.holdout_fraction, or pass --train.selection=last")


def resume_from(accelerator, state: TrainState, run_dir: Path, resume: str) -> None:
    """Load the checkpoint ``resume`` names (the newest that loads, for auto/force) and check it
    continues this run: same trajectory settings and sample order. A difference is a ConfigError
    listing it (exit 2) unless ``resume`` is "force", which is recorded."""
    expected = {"settings": state.settings, "data_order": state.data_order}
    force = resume == "force"
    checkpoint = checkpoints.load_for_resume(accelerator, run_dir, "auto" if force else resume)
    if checkpoint is None:
        return
    changes = resume_differences(state, expected)
    state.settings, state.data_order = expected["settings"], expected["data_order"]
    if not changes:
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
        return
    listing = "\n".join(f"  {change}" for change in changes)
    if not force:
        raise ConfigError(f"{checkpoint} does not continue this run:\n{listing}\nrerun with the checkpoint's "
                          "settings, choose another --output_dir, or pass --resume force to continue anyway")
    accelerator.print(f"resumed from {checkpoint} at step {state.step}\n"
                      f"WARNING: --resume force: continuing {checkpoint} despite:\n{listing}")
    state.forced_resumes.append({"step": state.step, "changes": changes})


def resume_differences(state: TrainState, expected: dict) -> list[str]:
    """What differs between a loaded checkpoint's run and this one, one line per key."""
    saved_order = state.data_order
    if saved_order.get("order_version") != expected["data_order"]["order_version"]:
        return [f"sample order: the checkpoint uses order version {saved_order.get('order_version')} (the "
                f"rank-dependent order of earlier rsc_dist versions); this version uses "
                f"{expected['data_order']['order_version']}"]
    changes = []
    for key, new in expected["data_order"].items():
        old = saved_order.get(key)
        if old != new:
            hint = (f" (with another number of processes, pass --data.global_batch_size={old})"
                    if key == "global_batch" else "")
            changes.append(f"data order {key}: {old!r} -> {new!r}{hint}")
    new_settings = expected["settings"]
    # Checkpoints from before the method registry hashed every method's section: another
    # method's section is not part of this run's trajectory.
    inactive = tuple(f"{name}." for name in methods.sections() if name != new_settings.get("algorithm"))
    old_settings = {key: value for key, value in state.settings.items() if not key.startswith(inactive)}
    if old_settings:  # saved before some settings existed: read with what those runs computed
        for key, value in EARLIER_DEFAULTS.items():
            if key in new_settings:
                old_settings.setdefault(key, value)
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            changes.append(f"{key}: {old_settings.get(key)!r} -> {new_settings.get(key)!r}")
    return changes


def report(accelerator, config, plan, state, meter, tracking, run_dir: Path, resumed_finished: bool,
           provenance: dict, trainables=None) -> None:
    """results.json (kept as it is when a finished run is rerun), the tracker's end-of-run
    records, and the accuracy table (with the averaged model's, under train.averaging)."""
    results_path = run_dir / RESULTS_FILE
    averaging = trainables.averaging if trainables is not None else None
    block = averaged.results_block(averaging, run_dir)
    if resumed_finished and results_path.exists():
        accelerator.print(f"{run_dir} was already complete at step {state.step}; {RESULTS_FILE} kept")
        block = json.loads(results_path.read_text()).get("averaged")  # SWAD's final evaluation is there
    else:
        results = results_document(config, plan, state, meter, run_dir, provenance=provenance, averaged=block,
                                   init_fingerprint=trainables.init_fingerprint if trainables is not None else None)
        if accelerator.is_main_process:
            results_path.write_text(json.dumps(results, indent=2))
        tracking.finish_run(results, run_dir)
    accelerator.print(format_accuracy_table(plan, state, block))
