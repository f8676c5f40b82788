"""Per-step cost of weight averaging (train.averaging): EMA and SWAD against a plain ERM step.

    python -m rsc_dist.bench_averaging                                      # CPU-sized defaults
    python -m rsc_dist.bench_averaging --arch resnet50 --resolution 224 --batch 128 --device cuda

Synthetic inputs already on the device. Two numbers per kind:
- the update alone (``Averager.after_optimizer_step`` on the trained weights, one fused lerp),
  timed over many calls, as a fraction of a plain ERM step: stable on a shared machine;
- whole steps with the update, timed in interleaved rounds against plain steps (plain, EMA,
  SWAD, plain, ...), the ratio being the median of the per-round ratios. SWAD also closes a
  segment every ``--eval-every`` steps (no evaluation is timed: that is the run's evaluation
  cadence, not the step's cost).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from rsc_dist.averaging.averager import Averager
from rsc_dist.averaging.fragments import Fragments
from rsc_dist.averaging.settings import AveragingConfig
from rsc_dist.bench import make_variant, run_benchmark, step_arguments, synchronize, train_steps

KINDS = ("ema", "swad")


class _Unwrapped:
    """What Fragments asks of an Accelerator for a model without a wrapper."""

    @staticmethod
    def unwrap_model(model):
        return model


def averager(kind: str, network) -> Averager:
    # A window that never ends within the benchmark, so every step keeps averaging.
    settings = AveragingConfig(swad_n_converge=1, swad_n_tolerance=1, swad_tolerance_ratio=1e9)
    return Averager(kind, settings, Fragments(_Unwrapped, network))


def bench_arch(args, arch: str, device: torch.device) -> dict:
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else nullcontext()
    model = make_variant("erm", arch, args.num_classes).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    averagers = {kind: averager(kind, model.network) for kind in KINDS}
    step = 0
    train_steps(model, optimizer, x, y, args.warmup, 0, autocast)
    for kind, avg in averagers.items():
        avg.after_optimizer_step(1)

    def timed(kind: str | None) -> float:
        nonlocal step
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            train_steps(model, optimizer, x, y, 1, step, autocast)
            step += 1
            if kind is not None:
                averagers[kind].after_optimizer_step(step)
                if kind == "swad" and step % args.eval_every == 0:
                    averagers[kind].at_evaluation(step, {"val_loss_mean": 1.0})
        synchronize(device)
        return (time.perf_counter() - start) / args.steps

    seconds = {name: [] for name in ("erm", *KINDS)}
    for _ in range(args.rounds):
        for name in seconds:
            seconds[name].append(timed(None if name == "erm" else name))
    erm_step = statistics.median(seconds["erm"])
    result = {"arch": arch, "batch": args.batch, "resolution": args.resolution,
              "erm_ms_per_step": 1000 * erm_step, "kinds": {}}
    for kind in KINDS:
        ratios = [s / e for s, e in zip(seconds[kind], seconds["erm"])]
        synchronize(device)
        start = time.perf_counter()
        calls = args.rounds * args.steps
        for call in range(calls):
            averagers[kind].after_optimizer_step(10_000 + call)
        synchronize(device)
        update = (time.perf_counter() - start) / calls
        result["kinds"][kind] = {"update_ms": 1000 * update, "update_fraction_of_erm_step": update / erm_step,
                                 "step_ratio_vs_erm": statistics.median(ratios), "per_round_ratio": ratios}
    return result


def format_table(results: list[dict], device_name: str) -> str:
    lines = [f"device: {device_name}",
             "| model | res | batch | ERM step (ms) | averaging | update alone (ms) | update / ERM step | whole step x ERM |",
             "|---|---|---|---|---|---|---|---|"]
    for result in results:
        for kind, row in result["kinds"].items():
            lines.append(f"| {result['arch']} | {result['resolution']} | {result['batch']} "
                         f"| {result['erm_ms_per_step']:.1f} | {kind} | {row['update_ms']:.2f} "
                         f"| {100 * row['update_fraction_of_erm_step']:.2f} % | {row['step_ratio_vs_erm']:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    step_arguments(parser)
    parser.add_argument("--eval-every", type=int, default=5, help="SWAD: steps per segment")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    return run_benchmark(parse_args(argv), bench_arch, format_table, "averaging on ")


if __name__ == "__main__":
    main()
