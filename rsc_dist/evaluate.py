"""Evaluate a saved model on every domain of its run, exactly as the trainer evaluates.

    python -m rsc_dist.evaluate runs/demo/rsc/sketch/seed0-XXXX/checkpoints/best
    python -m rsc_dist.evaluate RUN/checkpoints/checkpoint_00000120 --json eval.json
    python -m rsc_dist.evaluate RUN/checkpoints/best --data.root /other/copy/of/the/shards
    python -m rsc_dist.evaluate RUN/checkpoints/best --domains photo sketch   # whole domains
    python -m rsc_dist.evaluate RUN/checkpoints/best_averaged      # the averaged model (train.averaging)
    accelerate launch --num_processes 2 rsc_dist/evaluate.py RUN/checkpoints/best

CHECKPOINT is a best/ or best_averaged/ folder (its config.yaml inside; a soup's best/ too) or
a checkpoint_STEP folder (the run's
config is RUN/config.yaml, two levels up); ``--section.key=value`` overrides that config.
Without --domains: the sources' validation split and each target's whole domain (with
data.holdout_fraction: each target's in-split, and its out-split as a row of its own), as in the
run's results.json (on the run's best/ folder this reproduces results.json's "best" numbers, on
best_averaged/ those of "averaged.best").
With --domains: every sample of each named domain. The Accelerator and the network come from
rsc_dist.build, as in training: the same device checks (more ranks than GPUs, fp16 without a GPU,
...) and every collective bounded by the same timeout. Exit codes: 0 done, 2 bad checkpoint,
config, data or device request (one line on stderr).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch rsc_dist/evaluate.py` runs this as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before the imports below, which a process that only starts ranks never needs
    from rsc_dist.trainer.cpu_launch import exit_if_this_process_starts_the_ranks

    exit_if_this_process_starts_the_ranks(str(Path(__file__).resolve()), "rsc_dist.evaluate")

from rsc_dist.config import Config, load_config
from rsc_dist.core.contracts import CONFIG_FILE, EXIT_CONFIG, EXIT_OK
from rsc_dist.core.errors import UsageError
from rsc_dist.data.streams import error_line
from rsc_dist.trainer import build, checkpoints, cpu_launch, evaluation
from rsc_dist.trainer.plan import DataPlan, data_root


class EvaluateError(UsageError):
    """A checkpoint, config or data problem; the message is one line."""


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="rsc_dist.evaluate",
        description="Evaluate a checkpoint (a run's checkpoints/best or checkpoints/checkpoint_STEP "
                    "folder) on the run's domains. Config fields can be overridden with "
                    "--section.key=value, e.g. --data.root /other/shards.")
    parser.add_argument("checkpoint", help="a best/, best_averaged/ or checkpoint_STEP/ folder with "
                                           "model.safetensors")
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="also write the results here")
    parser.add_argument("--domains", nargs="+", metavar="D",
                        help="evaluate these domains, all of their samples (default: the run's "
                             "source validation splits and whole target domains)")
    return parser.parse_known_args(argv)


def locate(checkpoint: Path) -> tuple[Path, Path]:
    """(weights file, config file) of a best/ or checkpoint_STEP folder."""
    checkpoint = Path(checkpoint).expanduser()
    if not checkpoint.is_dir():
        previous = checkpoint.parent / f".old_{checkpoint.name}"  # save_best stopped between renames
        if checkpoint.name in (checkpoints.BEST_DIR, checkpoints.BEST_AVERAGED_DIR) and previous.is_dir():
            checkpoint = previous
        else:
            raise EvaluateError(f"{checkpoint}: no such checkpoint folder")
    weights = checkpoint / checkpoints.MODEL_FILE
    if not weights.is_file() and (checkpoint / checkpoints.DEEPSPEED_DIR).is_dir():
        raise EvaluateError(f"{checkpoint} is a DeepSpeed checkpoint (sharded weights, for resuming): "
                            "evaluate the run's checkpoints/best, which holds whole weights")
    if not weights.is_file():
        raise EvaluateError(f"{checkpoint} has no {checkpoints.MODEL_FILE}: give a run's checkpoints/best "
                            "or checkpoints/checkpoint_STEP folder")
    for config in (checkpoint / checkpoints.BEST_CONFIG_FILE, checkpoint.parent.parent / CONFIG_FILE):
        if config.is_file():
            return weights, config
    raise EvaluateError(f"no config for {checkpoint}: neither {checkpoint / checkpoints.BEST_CONFIG_FILE} "
                        f"nor {checkpoint.parent.parent / CONFIG_FILE} exists")


def load_run_config(config_path: Path, overrides: list[str]) -> Config:
    config = load_config(str(config_path), overrides)
    # The training batch does not matter here, but DataPlan checks that it divides into the
    # ranks: a run trained on 8 ranks must be evaluable on 1 or 3.
    return dataclasses.replace(config, data=dataclasses.replace(config.data, global_batch_size=None))


def load_weights(weights: Path) -> dict:
    """The state dict of a model.safetensors file (safetensors only: no DeepSpeed, no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise EvaluateError(f"{weights}: cannot read the weights ({error_line(exc).splitlines()[0][:300]})") from None


def domain_loaders(plan, domains: list[str], rank: int, pin: bool) -> dict:
    """Loaders of every sample of ``domains`` (as the "target" role), built by plan.eval_loaders."""
    unknown = [d for d in domains if d not in plan.domains]
    if unknown:
        raise EvaluateError(f"--domains {unknown}: not in the data, which has {list(plan.domains)}")
    whole = copy.copy(plan)
    manifest = plan.manifest
    whole.holdout = None  # every sample, whatever split the run drew
    whole.val_urls = []
    whole.target_urls = [str(p) for d in domains for split in manifest.splits[d]
                         for p in manifest.shard_paths(d, split)]
    return whole.eval_loaders(rank, pin)


def evaluate_checkpoint(checkpoint: Path, overrides: list[str] | None = None,
                        domains: list[str] | None = None, accelerator=None) -> dict:
    """The evaluation document: {"checkpoint", "step", "val_acc", "per_domain": {D: {"role",
    "top1", "top5", "n"}}}. Call on every rank (the counts are summed over ranks)."""
    weights, config_path = locate(checkpoint)
    config = load_run_config(config_path, list(overrides or []))
    # build.make_accelerator, as the trainer: the device checks, the collective timeout.
    accelerator = accelerator or build.make_accelerator(config, run_dir=None)
    plan = DataPlan(config, data_root(config, accelerator.main_process_first), accelerator.num_processes)
    model = build.evaluation_network(config, plan.manifest.num_classes, load_weights(weights),
                                     accelerator.device, source=str(weights))
    pin = accelerator.device.type == "cuda"
    if domains:
        loaders = domain_loaders(plan, list(dict.fromkeys(domains)), accelerator.process_index, pin)
    else:
        loaders = plan.eval_loaders(accelerator.process_index, pin)
    counts = evaluation.evaluate(accelerator, model, loaders, config, len(plan.domains))
    result = document(counts, plan, checkpoint, whole_domains=bool(domains))
    return {"checkpoint": result["checkpoint"], "step": checkpoint_step(weights.parent), **result}


def checkpoint_step(folder: Path) -> int | None:
    """The training step of a checkpoint folder (best/: from its evaluation.json)."""
    match = checkpoints.CHECKPOINT_PATTERN.match(folder.name)
    if match:
        return int(match.group(1))
    try:
        return json.loads((folder / checkpoints.EVALUATION_FILE).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None


def document(counts: dict, plan, checkpoint: Path, whole_domains: bool) -> dict:
    """Per-domain top-1/top-5/n from summed counts, with evaluation.summarize_evaluation's arithmetic."""
    summary = evaluation.summarize_evaluation(counts, plan.domains, -1, plan.sources, plan.targets)
    per_domain = {}
    held = plan.holdout is not None and not whole_domains
    for role, (top1, top5, total, _loss) in counts.items():
        for i, domain in enumerate(plan.domains):
            if total[i] > 0:
                key = domain
                if whole_domains:
                    kind = "source" if domain in plan.sources else "target" if domain in plan.targets else "other"
                    label = f"{kind} (all)"
                elif role == "val":
                    label = "source (val)"
                elif role == "target_out":  # a target's out-split (data.holdout_fraction): another row
                    label, key = "target (out-split)", f"{domain} (out-split)"
                else:
                    label = "target (in-split)" if held else "target"
                per_domain[key] = {"role": label, "top1": float(top1[i] / total[i]),
                                   "top5": float(top5[i] / total[i]), "n": int(total[i])}
    order = [key for d in plan.domains for key in (d, f"{d} (out-split)")]
    ordered = {key: per_domain[key] for key in order if key in per_domain}
    return {"checkpoint": str(checkpoint), "val_acc": None if whole_domains else summary["val_acc"],
            "val_acc_mean": None if whole_domains else summary["val_acc_mean"], "per_domain": ordered}


def format_table(result: dict) -> str:
    rows = [("domain", "role", "top-1", "top-5", "n")]
    for domain, row in result["per_domain"].items():
        rows.append((domain, row["role"], f"{100 * row['top1']:.2f}", f"{100 * row['top5']:.2f}", str(row["n"])))
    if result.get("val_acc") is not None:
        n = sum(r["n"] for r in result["per_domain"].values() if r["role"] == "source (val)")
        rows.append(("sources", "val (pooled)", f"{100 * result['val_acc']:.2f}", "", str(n)))
        if result.get("val_acc_mean") is not None:
            rows.append(("sources", "val (mean)", f"{100 * result['val_acc_mean']:.2f}", "", str(n)))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    started = cpu_launch.start_ranks_if_needed(str(Path(__file__).resolve()), argv, "rsc_dist.evaluate")
    if started is not None:
        return started
    args, overrides = parse_args(argv)
    try:
        _weights, config_path = locate(Path(args.checkpoint))
        accelerator = build.make_accelerator(load_run_config(config_path, overrides), run_dir=None)
        result = evaluate_checkpoint(Path(args.checkpoint), overrides, args.domains, accelerator)
    except (UsageError, FileNotFoundError) as exc:
        print(f"rsc_dist.evaluate: error: {error_line(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_CONFIG
    if accelerator.is_main_process:
        print(f"{args.checkpoint}\n{format_table(result)}")
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
