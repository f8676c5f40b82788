"""Training-step benchmark: ERM vs RSC (closed form, autograd path, released-code logic).

    python -m rsc_dist.bench                                   # CPU-sized defaults
    python -m rsc_dist.bench --arch resnet50 --resolution 224 --batch 256 --amp bf16 \
        --channels-last --device cuda                          # the GPU anchor setting
    python -m rsc_dist.bench --arch timm/vit_small_patch16_224,timm/convnext_tiny --resolution 96 \
        --variants erm,rsc_closed_form                         # timm backbones (RSC on tokens)

Synthetic inputs already on the device; every variant runs the same optimizer step. Variants
are timed in interleaved rounds (ERM, RSC, ... , ERM, RSC, ...) so that drift in machine load
hits all of them alike; the RSC/ERM ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from rsc_dist.methods import ERM, RSC
from rsc_dist.methods.base import StepBatch
from rsc_dist.methods.rsc_masks import DEFAULT_P_BATCH, draw_mode, rsc_mask
from rsc_dist.methods.rsc_released import released_mask
from rsc_dist.models.build import build_model
from rsc_dist.models.layouts import layout_of
from rsc_dist.models.network import Network

VARIANTS = ("erm", "rsc_closed_form", "rsc_autograd", "rsc_released_logic")


class OpaqueHead(nn.Module):
    """Hides a pooled linear head's classifier from the closed form, forcing the autograd
    saliency path (the features' layout and the pooled features stay the head's)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.inner = head
        self.layout = layout_of(head)
        self.in_channels = head.in_channels

    def pooled(self, z):
        return self.inner.pooled(z)

    def forward(self, z):
        return self.inner(z)


class MethodModel(nn.Module):
    """A network and a method as one module: ``forward(x, y, mode=, p_batch=)`` runs the method's
    objective (inside the network's forward, as the trainer does) and returns its logits."""

    def __init__(self, network: Network, method):
        super().__init__()
        self.network, self.method = network, method

    @property
    def features(self):
        return self.network.features

    @property
    def head(self):
        return self.network.head

    def forward(self, x, y, *, mode, p_batch):
        batch = StepBatch(images=x, labels=y, pixels=x)
        out = self.network(x, objective=self.method.objective, batch=batch, draws={"mode": mode, "p_batch": p_batch})
        return out.logits


class ReleasedLogicModel(nn.Module):
    """The released code's forward, for cost comparison: ``rsc_released.released_mask`` (a
    backward through the head into a copy of the features, full sorts, a ``nonzero()`` host
    sync), the head gradients it leaves cleared as the released ``zero_grad`` does, then the
    masked head."""

    def __init__(self, base: Network):
        super().__init__()
        self.features, self.head = base.features, base.head

    def forward(self, x, y, *, mode, p_batch):
        z = self.features(x)
        mask = released_mask(z, self.head, y, mode, p_batch=p_batch)
        for parameter in self.head.parameters():
            parameter.grad = None
        return self.head(z * mask)


def make_variant(name: str, arch: str, num_classes: int, image_size: int | None = None) -> nn.Module:
    torch.manual_seed(0)
    base = build_model(arch, num_classes, image_size=image_size)
    if name == "rsc_autograd":
        base.head = OpaqueHead(base.head)
    if name == "rsc_released_logic":
        return ReleasedLogicModel(base)
    return MethodModel(base, ERM() if name == "erm" else RSC())


def train_steps(model, optimizer, x, y, steps, start_step, autocast) -> None:
    for step in range(start_step, start_step + steps):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = model(x, y, mode=draw_mode("spatial+channel", 0, step), p_batch=DEFAULT_P_BATCH)
            loss = F.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_arch(args, arch: str, device: torch.device) -> dict:
    x = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.to(memory_format=memory_format)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.amp == "bf16" else nullcontext()
    )
    runs = {}
    for name in args.variants:
        model = make_variant(name, arch, args.num_classes, args.resolution).to(device, memory_format=memory_format)
        if name == "rsc_released_logic" and layout_of(model.head).kind != "nchw":
            print(f"{arch}: rsc_released_logic skipped (the released code handles NCHW feature maps only)")
            continue
        model.train()
        if args.compile:
            model.features.compile()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        train_steps(model, optimizer, x, y, args.warmup, 0, autocast)
        runs[name] = (model, optimizer)
    rates = {name: [] for name in runs}
    for round_index in range(args.rounds):
        for name, (model, optimizer) in runs.items():
            synchronize(device)
            start = time.perf_counter()
            train_steps(model, optimizer, x, y, args.steps, 1000 * (round_index + 1), autocast)
            synchronize(device)
            rates[name].append(args.batch * args.steps / (time.perf_counter() - start))
    result = {"arch": arch, "batch": args.batch, "resolution": args.resolution, "variants": {},
              "mask_overhead": mask_overhead(args, runs, x, y, device, rates)}
    for name, per_round in rates.items():
        ratios = [r / e for r, e in zip(per_round, rates["erm"])] if "erm" in rates else []
        result["variants"][name] = {
            "img_s": statistics.median(per_round),
            "ratio_vs_erm": statistics.median(ratios) if ratios else None,
            "per_round_img_s": per_round,
        }
    return result


def mask_overhead(args, runs, x, y, device, rates) -> dict:
    """Time of the RSC mask computation alone (on this batch's features), as a fraction of an
    ERM step. Whole-step ratios on a shared CPU wobble by a few percent; this does not."""
    out = {}
    for name in ("rsc_closed_form", "rsc_autograd"):
        if name not in runs or "erm" not in rates:
            continue
        model = runs[name][0]
        with torch.no_grad():
            z = model.features(x)
        calls = args.rounds * args.steps
        synchronize(device)
        start = time.perf_counter()
        for step in range(calls):
            rsc_mask(z, model.head, y, mode=draw_mode("spatial+channel", 0, step), p_batch=DEFAULT_P_BATCH)
        synchronize(device)
        seconds = (time.perf_counter() - start) / calls
        erm_step = args.batch / statistics.median(rates["erm"])
        out[name] = {"ms_per_step": 1000 * seconds, "fraction_of_erm_step": seconds / erm_step}
    return out


def format_table(results: list[dict], device_name: str) -> str:
    lines = [
        f"device: {device_name}",
        "| model | res | batch | variant | img/s | x ERM |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        for name, row in result["variants"].items():
            ratio = "—" if row["ratio_vs_erm"] is None else f"{row['ratio_vs_erm']:.3f}"
            lines.append(
                f"| {result['arch']} | {result['resolution']} | {result['batch']} | {name} "
                f"| {row['img_s']:.1f} | {ratio} |"
            )
    for result in results:
        for name, row in result["mask_overhead"].items():
            lines.append(f"{result['arch']}: {name} mask alone {row['ms_per_step']:.2f} ms/step = "
                         f"{100 * row['fraction_of_erm_step']:.2f} % of an ERM step")
    return "\n".join(lines)


def step_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a training-step benchmark (this one and rsc_dist.bench_averaging)."""
    parser.add_argument("--arch", default="resnet18",
                        help="comma-separated model.arch values: resnet18,resnet50,alexnet,timm/vit_small_patch16_224")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=7)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and variant")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--json", help="also write the results to this JSON file")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    step_arguments(parser)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


def resolve_device(name: str) -> torch.device:
    """The device ``--device`` names; a one-line error (exit 2) for one this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        _fail(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            _fail(f"--device {name}: this machine has no CUDA GPU (torch sees none); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            _fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type != "cpu":
        _fail(f"--device {name}: only cpu and cuda are benchmarked here")
    return device


def _fail(message: str) -> None:
    print(f"rsc_dist.bench: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def run_benchmark(args, bench, table, what: str = "") -> list[dict]:
    """``bench(args, arch, device)`` for every --arch, the ``table`` printed, --json written."""
    device = resolve_device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu ({torch.get_num_threads()} threads)"
    )
    print(f"benchmarking {what}{args.arch} at {args.resolution}px, batch {args.batch} on {device_name}; "
          f"{args.rounds} rounds x {args.steps} steps per variant", flush=True)
    results = [bench(args, arch, device) for arch in args.arch.split(",")]
    print(table(results, device_name))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "torch": torch.__version__, "results": results}, handle, indent=2)
    return results


def main(argv=None) -> list[dict]:
    return run_benchmark(parse_args(argv), bench_arch, format_table)


if __name__ == "__main__":
    main()
