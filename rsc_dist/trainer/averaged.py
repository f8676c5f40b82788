"""The averaged model in a run (train.averaging; rsc_dist.averaging): built with the run's
engine, evaluated beside the trained model, selected, saved as checkpoints/best_averaged/.

How each kind is evaluated and selected:
- ema, swa: at every evaluation of the run (once the average has started), on the same
  domains as the trained model; train.selection chooses among these evaluations, as for the
  trained model, and checkpoints/best_averaged/ holds the chosen average.
- swad: every evaluation closes a segment and feeds the source validation loss to the
  loss-valley rule; the final average is evaluated once, when training ends (or when the
  valley ends and averaging.swad_early_stop stops the run), and is its best and last.

An averaged network is a plain copy (no DDP or DeepSpeed wrapper) holding the whole averaged
parameters and the trained model's buffers; when BatchNorm is not frozen its statistics are
recomputed over the global batch on source training data before it is evaluated or saved
(rsc_dist.averaging.batchnorm).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rsc_dist.averaging.averager import Averager
from rsc_dist.averaging.batchnorm import recompute_batchnorm
from rsc_dist.config import Config, to_dict
from rsc_dist.core.errors import ConfigError
from rsc_dist.data.streams import DevicePrefetch, make_loader
from rsc_dist.trainer import build, checkpoints
from rsc_dist.trainer.evaluation import evaluate, evaluation_autocast, summarize_evaluation
from rsc_dist.trainer.step import prepare_batch


def check_averaging_data(config: Config, plan) -> None:
    """Refuse before training what averaging cannot do with this data and length."""
    kind = config.train.averaging
    if kind == "swad":
        empty = [d for d in plan.sources if plan.manifest.num_samples(d, "val") <= 0]
        if empty:
            raise ConfigError(f"train.averaging=swad reads the source validation loss, but source domain(s) "
                              f"{', '.join(empty)} have 0 val samples in {plan.manifest.root}/_info.json")
    if kind == "swa" and config.averaging.swa_start_step >= plan.total_steps:
        raise ConfigError(f"averaging.swa_start_step={config.averaging.swa_start_step} is not before the run's "
                          f"last step ({plan.total_steps}): nothing would be averaged")


def source_batches(config: Config, plan, accelerator, count: int):
    """This rank's share of the first ``count`` global training batches (epoch 0 on, augmented
    as in training, as the forward sees them): the same batches on any number of ranks."""
    device = accelerator.device
    stream = plan.train_stream(accelerator.process_index, device.type)
    produced, epoch = 0, 0
    while produced < count:
        stream.set_position(epoch, 0)
        loader = make_loader(stream, config.data.workers, device.type == "cuda")
        for batch in DevicePrefetch(iter(loader), device):
            yield prepare_batch(config, batch, device).images
            produced += 1
            if produced == count:
                break
        del loader
        epoch += 1


def averaged_network(config: Config, num_classes: int, accelerator, model, averaged: dict) -> torch.nn.Module:
    """A plain network with the ``averaged`` parameters and the trained model's buffers."""
    # Building a network draws its initial weights from the global generator: the trained
    # model's later draws (dropout) must not depend on whether an average is evaluated.
    with torch.random.fork_rng(devices=[]):
        if build.zero_stage(accelerator) == 3:  # the module's parameters are partitioned placeholders
            state = build.evaluation_model(config, num_classes, accelerator, model).state_dict()
        else:
            state = accelerator.unwrap_model(model).state_dict()
        state = {key: value for key, value in state.items() if not key.startswith(build.METHOD_PREFIX)}
        state.update(averaged)
        return build.evaluation_network(config, num_classes, state, accelerator.device,
                                        source="the averaged weights")


def evaluate_average(run, eval_loaders: dict) -> dict | None:
    """Evaluate the averaged model now (every rank), record it, save it when it becomes the
    best, log it. Returns its evaluation record, None when there is no average yet."""
    config, plan, accelerator, state = run.config, run.plan, run.accelerator, run.state
    averager = run.trainables.averaging
    weights = averager.whole_average()
    if weights is None:
        return None
    network = averaged_network(config, plan.manifest.num_classes, accelerator, run.trainables.model, weights)
    del weights
    if not config.model.freeze_bn:
        group = torch.distributed.group.WORLD if accelerator.num_processes > 1 else None
        recompute_batchnorm(network, source_batches(config, plan, accelerator, config.averaging.bn_batches),
                            group, lambda: evaluation_autocast(accelerator))
    counts = evaluate(accelerator, network, eval_loaders, config, len(plan.domains))
    evaluation = summarize_evaluation(counts, plan.domains, state.step, plan.sources, plan.targets)
    if averager.record(evaluation):
        checkpoints.save_best(accelerator, None, run.run_dir, evaluation, to_dict(config),
                              folder=checkpoints.BEST_AVERAGED_DIR, state_dict=network.state_dict())
    run.tracking.log_averaged_evaluation(evaluation, state.step, averager.records["best"], averager.label)
    return evaluation


def at_evaluation(run, evaluation: dict, eval_loaders: dict) -> bool:
    """After the trained model's evaluation: SWAD's segment and rule, or the EMA/SWA model's
    evaluation. True when the run should stop here (SWAD's valley ended, with early stop)."""
    averager = run.trainables.averaging
    if averager is None:
        return False
    ended = averager.at_evaluation(run.state.step, evaluation)
    if averager.kind != "swad":
        evaluate_average(run, eval_loaders)
    if ended:
        stops = run.config.averaging.swad_early_stop
        run.accelerator.print(f"SWAD: the loss valley ended at step {run.state.step} (its loss stayed above "
                              f"{averager.valley.threshold:.4f})" + ("; training stops here "
                                                                     "(averaging.swad_early_stop)" if stops else ""))
    return stops_early(run)


def stops_early(run) -> bool:
    """Whether the run ends before its last step: SWAD's valley ended and early stop is on."""
    averager = run.trainables.averaging
    return (averager is not None and averager.kind == "swad" and averager.valley.ended
            and run.config.averaging.swad_early_stop)


def finish(run, eval_loaders: dict) -> None:
    """Training is over: SWAD decides its last segments and evaluates its final average once."""
    averager = run.trainables.averaging
    if averager is None:
        return
    averager.finish()
    if averager.kind == "swad":
        if evaluate_average(run, eval_loaders) is None:
            run.accelerator.print(f"SWAD: {averager.note()}; no averaged model")


def results_block(averager: Averager | None, run_dir: Path | None) -> dict | None:
    """results.json's "averaged" (rsc_dist/core/contracts.py, AVERAGED_RECORD)."""
    if averager is None:
        return None
    best_checkpoint = None
    if averager.records["best"] and run_dir is not None \
            and (Path(run_dir) / checkpoints.BEST_AVERAGED_RELATIVE).is_dir():
        best_checkpoint = checkpoints.BEST_AVERAGED_RELATIVE
    records = averager.records
    return {"kind": averager.kind, "label": averager.label, "best": records["best"] or None,
            "last": records["last"] or None, "history": records["history"], "best_checkpoint": best_checkpoint,
            "window": averager.window(), "note": averager.note()}
