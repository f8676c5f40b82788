"""Input-pipeline benchmark: does the shard stream keep the model fed?

    python -m rsc_dist.bench_input                       # demo shards, demo preset, CPU
    python -m rsc_dist.bench_input --decode device       # workers read bytes; decode+augment batched
    python -m rsc_dist.bench_input --shards /data/shards/pacs --config pacs_resnet50 \
        --workers 16 --steps 50                           # on a GPU node
    python -m rsc_dist.bench_input --loader-only          # the loader alone

Three rates with the trainer's own code (``TrainStream``, ``prepare_batch``, ``train_step``):
the loader alone (with --decode device: bytes and parameters only, the decode happens in the
step), training steps fed from the shards, and the same steps on one batch already in memory
(already decoded and augmented, on the device). "fed fraction" = from-shards / in-memory rate.
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator

from rsc_dist import engine
from rsc_dist.config import load_config
from rsc_dist.data import make_loader
from rsc_dist.build import build_training_model
from rsc_dist.plan import DataPlan, data_root


def loader_rate(stream, workers: int, steps: int) -> float:
    stream.set_position(0, 0)
    batches = iter(make_loader(stream, workers, pin_memory=False))
    first = next(batches)  # worker start-up is not throughput
    start, images = time.perf_counter(), 0
    for _, batch in zip(range(steps), batches):
        images += batch["label"].shape[0]
    del first
    return images / (time.perf_counter() - start)


def training_rate(accelerator, model, optimizer, scheduler, config, batches, steps: int) -> float:
    device = accelerator.device
    step_inputs = lambda step, batch: engine.prepare_batch(config, batch, device, step, 10**9)
    first = next(batches)
    engine.train_step(accelerator, model, optimizer, scheduler, step_inputs(0, first))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, images = time.perf_counter(), 0
    for step, batch in zip(range(1, steps + 1), batches):
        engine.train_step(accelerator, model, optimizer, scheduler, step_inputs(step, batch))
        images += batch["label"].shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--shards", help="shard root (default: the demo shards, built if missing)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the preset's)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--decode", choices=("workers", "device", "auto"), help="data.decode (default: the preset's)")
    parser.add_argument("--loader-only", action="store_true", help="measure the loader alone")
    args, overrides = parser.parse_known_args(argv)
    if args.decode:
        overrides.append(f"--data.decode={args.decode}")
    if args.shards:
        overrides.append(f"--data.root={args.shards}")
    if args.workers is not None:
        overrides.append(f"--data.workers={args.workers}")
    config = load_config(args.config, overrides)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    plan = DataPlan(config, data_root(config, accelerator.main_process_first), world_size=1)
    stream = plan.train_stream(0, accelerator.device.type)
    rates = {"loader only": loader_rate(stream, config.data.workers, args.steps)}
    device = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else (
        f"cpu ({torch.get_num_threads()} threads)")
    where = "device" if stream.decode_on_device else "workers"
    if args.loader_only:
        print(f"loader: {plan.local_batch} samples per batch, {config.data.image_size}px, decode in {where}, "
              f"{config.data.workers} worker(s), {args.steps} batches")
        print(f"| loader only | {rates['loader only']:.1f} |")
        return {"rates": rates}

    model = build_training_model(config, plan.manifest.num_classes, accelerator, plan.local_forward_batch,
                                 num_domains=len(plan.domains))
    optimizer = engine.build_optimizer(config, model)
    scheduler = engine.build_scheduler(config, optimizer, 10**9)
    model, optimizer = accelerator.prepare(model, optimizer)
    stream.set_position(0, 0)
    from_shards = iter(make_loader(stream, config.data.workers, accelerator.device.type == "cuda"))
    rates["train, from shards"] = training_rate(accelerator, model, optimizer, scheduler, config,
                                                from_shards, args.steps)
    first = next(iter(make_loader(stream, 0, False)))
    pixels = engine.prepare_batch(config, first, accelerator.device, 0, 10**9).pixels
    synthetic_batch = {"image": pixels, "label": first["label"]}  # decoded and augmented already
    synthetic = iter(lambda: synthetic_batch, None)
    rates["train, synthetic in memory"] = training_rate(accelerator, model, optimizer, scheduler, config,
                                                        synthetic, args.steps)
    fed = rates["train, from shards"] / rates["train, synthetic in memory"]
    print(f"{config.model.arch} {config.algorithm} at {config.data.image_size}px, batch {plan.local_forward_batch}, "
          f"{config.data.workers} loader worker(s), decode in {where}, {args.steps} steps, device {device}")
    print("| measurement | img/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} |")
    print(f"fed fraction (from shards / synthetic): {fed:.3f}")
    return {"rates": rates, "fed_fraction": fed}


if __name__ == "__main__":
    main()
