"""Method-step benchmark: each registered method's whole training step relative to ERM's.

    python -m rsc_dist.bench_methods                                   # every registered method, CPU-sized
    python -m rsc_dist.bench_methods --methods erm,coral,mmd,groupdro,irm,vrex
    python -m rsc_dist.bench_methods --arch resnet50 --resolution 224 --per-domain 32 --device cuda

A step is the method's own ``train_step`` (draws, its inputs transform, its forwards,
backwards and optimizer steps, its state writes) driven through the trainer's Runner
(rsc_dist.trainer.step) on one process, on a synthetic balanced global batch: ``--per-domain``
images of each of ``--sources`` source domains, laid out as the data stream lays them out (each
domain's share in turn, ``order`` the place in the global batch), with the manifest holding one
more (target) domain. Every method is built with its config section's defaults, and with its
own modules and parameter groups, as the trainer builds it (the optimizer: optim.*'s defaults).

Methods are timed in interleaved rounds (ERM, CORAL, ..., ERM, CORAL, ...) so that drift in
machine load hits all of them alike; a method's ratio to ERM is the median of its per-round
ratios. On one process the collectives of the global-batch methods are no-ops: their cost on
several ranks adds one all-gather or all-reduce of a few numbers per sample.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch

from rsc_dist import methods
from rsc_dist.bench import resolve_device, synchronize
from rsc_dist.methods.base import MethodContext, StepBatch
from rsc_dist.models.build import build_model
from rsc_dist.trainer.optim import build_optimizer
from rsc_dist.trainer.settings import OptimConfig
from rsc_dist.trainer.step import Runner


class LocalAccelerator:
    """What the Runner asks of Accelerate on one process: autocast and backward."""

    def __init__(self, device: torch.device, amp: str):
        self.device, self.amp = device, amp

    def autocast(self):
        if self.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def backward(self, loss):
        loss.backward()


def synthetic_batch(args, device: torch.device) -> StepBatch:
    """A balanced global batch: ``per_domain`` images of each source domain, domain after domain."""
    g = torch.Generator().manual_seed(0)
    n = args.per_domain * args.sources
    images = torch.randn(n, 3, args.resolution, args.resolution, generator=g)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return StepBatch(images=images.to(device, memory_format=memory_format),
                     labels=torch.randint(0, args.num_classes, (n,), generator=g).to(device),
                     pixels=torch.zeros(n, 3, 1, 1, dtype=torch.uint8, device=device),
                     sample_ids=torch.randint(0, 2**62, (n,), generator=g).to(device),
                     domains=torch.arange(args.sources).repeat_interleave(args.per_domain).to(device),
                     order=torch.arange(n, device=device))


class MethodRun:
    """One method's network, optimizer and method, built as the trainer builds them."""

    def __init__(self, name: str, args, device: torch.device):
        torch.manual_seed(0)
        self.network = build_model(args.arch, args.num_classes, freeze_bn=args.freeze_bn)
        context = MethodContext(seed=0, num_classes=args.num_classes, num_domains=args.sources + 1,
                                feature_dim=self.network.feature_dim, capacity=args.per_domain * args.sources,
                                balanced=True)
        self.method = methods.build(name, None, context)
        self.network.method = self.method.build_modules()
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.network.to(device, memory_format=memory_format)
        if args.compile:
            self.network.features.compile()
        self.optimizer = build_optimizer(OptimConfig(), self.method.parameter_groups(self.network))
        self.accelerator = LocalAccelerator(device, args.amp)

    def steps(self, batch: StepBatch, first: int, count: int) -> None:
        for step in range(first, first + count):
            runner = Runner(self.accelerator, self.network, self.optimizer, self.network, step)
            self.method.train_step(runner, batch, self.method.draws(step, 10**6, batch.sample_ids))


def bench(args, device: torch.device) -> dict:
    batch = synthetic_batch(args, device)
    runs = {name: MethodRun(name, args, device) for name in args.methods}
    for run in runs.values():
        run.steps(batch, 0, args.warmup)
    rates = {name: [] for name in args.methods}
    for round_index in range(args.rounds):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            # Steps far from 0: a method's scheduled switches (IRM's anneal step) are past.
            run.steps(batch, 10**5 * (round_index + 1), args.steps)
            synchronize(device)
            rates[name].append(len(batch.labels) * args.steps / (time.perf_counter() - start))
    result = {"arch": args.arch, "resolution": args.resolution, "global_batch": len(batch.labels), "methods": {}}
    for name, per_round in rates.items():
        ratios = [e / r for r, e in zip(per_round, rates["erm"])]
        result["methods"][name] = {"img_s": statistics.median(per_round),
                                   "step_time_vs_erm": statistics.median(ratios),
                                   "per_round_img_s": per_round}
    return result


def format_table(result: dict, device_name: str) -> str:
    lines = [f"device: {device_name}; {result['arch']} at {result['resolution']} px, global batch "
             f"{result['global_batch']}",
             "| method | img/s | step time x ERM |", "|---|---|---|"]
    for name, row in result["methods"].items():
        lines.append(f"| {name} | {row['img_s']:.1f} | {row['step_time_vs_erm']:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--methods", default="all",
                        help=f"comma-separated registered methods, or all ({','.join(methods.NAMES)}); "
                             "erm is always timed, as the reference")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--sources", type=int, default=3, help="source domains in each step")
    parser.add_argument("--per-domain", type=int, default=16, help="images of each source domain per step")
    parser.add_argument("--num-classes", type=int, default=7)
    parser.add_argument("--freeze-bn", action="store_true", help="BatchNorm in eval mode, as the exactness tests")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and method")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    chosen = list(methods.NAMES) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    unknown = [m for m in chosen if m not in methods.METHODS]
    if unknown:
        parser.error(f"unknown --methods {unknown}; registered: {','.join(methods.NAMES)}")
    args.methods = ["erm"] + [m for m in dict.fromkeys(chosen) if m != "erm"]
    if args.sources < 1 or args.per_domain < 2:
        parser.error("--sources must be at least 1 and --per-domain at least 2 (IRM splits each domain in halves)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = resolve_device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu ({torch.get_num_threads()} threads)")
    print(f"benchmarking {', '.join(args.methods)}: {args.arch} at {args.resolution}px, "
          f"{args.sources} x {args.per_domain} images per step on {device_name}; "
          f"{args.rounds} rounds x {args.steps} steps per method", flush=True)
    result = bench(args, device)
    print(format_table(result, device_name))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "torch": torch.__version__, **result}, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
