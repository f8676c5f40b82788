"""Input-pipeline benchmark: does the shard stream keep the model fed?

    python -m rsc_dist.bench_input                       # demo shards, demo preset, CPU
    python -m rsc_dist.bench_input --decode device       # workers read bytes; decode+augment batched
    python -m rsc_dist.bench_input --shards /data/shards/pacs --config pacs_resnet50 \
        --workers 16 --steps 50                           # on a GPU node
    python -m rsc_dist.bench_input --loader-only          # the loader alone
    python -m rsc_dist.bench_input --augment-only         # aten ops and CPU time of the augmentation
    python -m rsc_dist.bench_input --loader-start 5       # loader start-up: fork, fork server, spawn
    python -m rsc_dist.bench_input --loader-start 25 --start-methods spawn   # one start method alone

Three rates with the trainer's own code (``TrainStream``, ``prepare_batch``, ``train_step``):
the loader alone (with --decode device: bytes and parameters only, the decode happens in the
step), training steps fed from the shards, and the same steps on one batch already in memory
(already decoded and augmented, on the device). "fed fraction" = from-shards / in-memory rate.
With ``--decode device`` it also reports the device path's aten ops per batch (decode +
augmentation, counted by a dispatch mode), the host time the training thread spends issuing
them per batch, and the JPEG decoder that ran.

``--loader-start N`` times N starts of the training loader per way of starting its workers,
interleaved: forked from this process (the old loader), from the fork server (the trainer's,
``make_loader``; the server's own start, once per process, is reported apart) and spawned (a
fresh interpreter per worker): the seconds from ``iter(loader)`` to the first batch and to the
end of ``--steps`` batches (median over the starts). ``--start-methods`` keeps some of the three
(comma-separated: fork, forkserver, spawn), each then alone in its process: a message a worker
prints as the loader is deleted mid-stream is then known to come from that start method.

``--augment-only`` measures the augmentation alone on synthetic ImageNet-like images (about
500 x 375, mixed orientations, default jitter, 224 px, one CPU thread as in a loader worker),
for batches of 32 and 256: the worker path (``augment_one`` per image) and the device path
(``augment_batch`` on the whole batch, ops on whole subsets as on an accelerator). It uses only
functions older versions have too, so ``PYTHONPATH=<old checkout> python
rsc_dist/bench_input.py --augment-only`` measures the code before a change.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from accelerate import Accelerator
from torch.utils._python_dispatch import TorchDispatchMode

from rsc_dist.config import load_config
from rsc_dist.data.streams import make_loader
from rsc_dist.trainer import optim
from rsc_dist.trainer.build import build_training_model
from rsc_dist.trainer.plan import DataPlan, data_root
from rsc_dist.trainer.step import Trainables, prepare_batch, train_on_batch


def loader_rate(stream, workers: int, steps: int) -> float:
    stream.set_position(0, 0)
    batches = iter(make_loader(stream, workers, pin_memory=False))
    first = next(batches)  # worker start-up is not throughput
    start, images = time.perf_counter(), 0
    for _, batch in zip(range(steps), batches):
        images += batch["label"].shape[0]
    del first
    return images / (time.perf_counter() - start)


START_METHODS = ("fork", "forkserver", "spawn")


def loader_start_costs(stream, workers: int, starts: int, steps: int, methods=START_METHODS) -> list[dict]:
    """Median seconds to the first batch and to ``steps`` batches per start method (docstring)."""
    import multiprocessing
    import statistics

    from torch.utils.data import DataLoader

    from rsc_dist.data import streams

    def loader(method: str):
        if method == "forkserver":
            return make_loader(stream, workers, pin_memory=False)
        return DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=streams._worker_init,
                          multiprocessing_context=multiprocessing.get_context(method),
                          generator=torch.Generator().manual_seed(0), prefetch_factor=4)

    def one_start(method: str) -> tuple[float, float]:
        stream.set_position(0, 0)
        begin = time.perf_counter()
        batches = iter(loader(method))
        next(batches)
        first = time.perf_counter() - begin
        for _, _batch in zip(range(steps - 1), batches):
            pass
        del batches
        return first, time.perf_counter() - begin

    if "forkserver" in methods:
        begin = time.perf_counter()
        streams.start_worker_server()  # returns at once; the server imports while the first loader waits
        server_start = time.perf_counter() - begin + one_start("forkserver")[0]
    timings = {method: [] for method in methods}
    for _ in range(starts):
        for method in methods:
            timings[method].append(one_start(method))
    rows = [{"workers from": "this process (fork; the old loader)", "method": "fork"},
            {"workers from": "the fork server (the trainer's loader)", "method": "forkserver"},
            {"workers from": "a fresh interpreter each (spawn)", "method": "spawn"}]
    rows = [row for row in rows if row["method"] in methods]
    for row in rows:
        firsts, wholes = zip(*timings[row["method"]])
        row.update(first=statistics.median(firsts), whole=statistics.median(wholes))
        if row["method"] == "forkserver":
            row["server start"] = server_start
    return rows


def start_methods(text: str) -> tuple[str, ...]:
    """--start-methods: a comma-separated subset of START_METHODS, in that order."""
    asked = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in asked if name not in START_METHODS]
    if unknown or not asked:
        raise argparse.ArgumentTypeError(f"{text!r}: expected some of {', '.join(START_METHODS)}")
    return tuple(name for name in START_METHODS if name in asked)


class CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.count, self.by_name = 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        self.by_name[str(func)] += 1
        return func(*args, **(kwargs or {}))


def jpeg_backend(device: torch.device) -> str:
    """Which JPEG decoder the device path runs on ``device``."""
    import torchcodec

    if device.type == "cuda":
        return f"torchcodec {torchcodec.__version__} decode_jpeg on {device} (nvJPEG batch decode)"
    return f"torchcodec {torchcodec.__version__} decode_jpeg on the CPU (libjpeg-turbo)"


def device_path_stats(stream, device: torch.device, batches: int = 6) -> dict:
    """aten ops per batch and host ms per batch of the device path's decode + augmentation
    (``data.device_images``), as the training thread issues them (no wait for the device)."""
    from rsc_dist.data.streams import device_images

    stream.set_position(0, 0)
    loaded = [batch for _, batch in zip(range(batches), make_loader(stream, 0, False))]
    device_images(loaded[0], device)  # warm-up (allocator, decoder)
    with CountOps() as ops:
        device_images(loaded[0], device)
    host = []
    for batch in loaded[1:]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        device_images(batch, device)
        host.append(time.perf_counter() - start)
    host.sort()
    return {"ops per batch": ops.count, "host ms per batch": 1000 * host[len(host) // 2],
            "jpeg decoder": jpeg_backend(device)}


def _synthetic_images(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(375, 500), (500, 375), (333, 500), (400, 500), (375, 499), (500, 332)]
    images = []
    for index in range(count):
        height, width = shapes[index % len(shapes)]
        coarse = torch.randint(0, 256, (1, 3, height // 8, width // 8), generator=generator).float()
        images.append(torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0]
                      .round().to(torch.uint8))
    return images


def augment_costs(sizes=(32, 256), image_size: int = 224, repeats: int = 2) -> list[dict]:
    """aten ops and CPU ms per batch of the augmentation, worker path and device path."""
    from rsc_dist.data import augment as A

    torch.set_num_threads(1)
    chunk = A._CPU_CHUNK_ELEMENTS
    rows = []
    for count in sizes:
        images = _synthetic_images(count, count)
        params = torch.stack([A.draw_params(A.Augment(image_size), *image.shape[1:], index)
                              for index, image in enumerate(images)])
        paths = {"worker (augment_one per image)": lambda: [A.augment_one(image, row) for image, row in zip(images, params)],
                 "device (augment_batch, whole subsets)": lambda: A.augment_batch(images, params)}
        for path, run in paths.items():
            worker = path.startswith("worker")  # the device rows run as on an accelerator
            A._CPU_CHUNK_ELEMENTS, A._CPU_PER_IMAGE_RESIZE = (chunk, True) if worker else (1 << 40, False)
            with CountOps() as ops:
                run()
            times = []
            for _ in range(repeats):
                start = time.process_time()
                run()
                times.append(time.process_time() - start)
            rows.append({"path": path, "batch": count, "ops": ops.count, "cpu ms": 1000 * min(times)})
    A._CPU_CHUNK_ELEMENTS, A._CPU_PER_IMAGE_RESIZE = chunk, True
    return rows


def training_rate(accelerator, trained, config, batches, steps: int) -> float:
    device = accelerator.device
    first = next(batches)
    train_on_batch(accelerator, trained, config, first, 0, 10**9)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, images = time.perf_counter(), 0
    for step, batch in zip(range(1, steps + 1), batches):
        train_on_batch(accelerator, trained, config, batch, step, 10**9)
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
    parser.add_argument("--augment-only", action="store_true",
                        help="aten ops and CPU time of the augmentation alone (synthetic images, batches 32 and 256)")
    parser.add_argument("--loader-start", type=int, metavar="N",
                        help="time N loader starts per start method (fork, fork server, spawn), interleaved")
    parser.add_argument("--start-methods", type=start_methods, default=START_METHODS, metavar="M[,M]",
                        help="with --loader-start: only these of fork, forkserver, spawn (default: all three)")
    args, overrides = parser.parse_known_args(argv)
    if args.start_methods != START_METHODS and not args.loader_start:
        parser.error("--start-methods applies to --loader-start N only")
    if args.augment_only:
        rows = augment_costs()
        print("augmentation alone, ~500x375 -> 224 px, default jitter, 1 CPU thread")
        print("| path | batch | aten ops per batch | CPU ms per batch |\n|---|---|---|---|")
        for row in rows:
            print(f"| {row['path']} | {row['batch']} | {row['ops']} | {row['cpu ms']:.0f} |")
        return {"augment": rows}
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
    if args.loader_start:
        rows = loader_start_costs(stream, config.data.workers, args.loader_start, args.steps, args.start_methods)
        print(f"loader start-up: {config.data.workers} worker(s), {plan.local_batch} samples per batch, "
              f"{config.data.image_size}px, median of {args.loader_start} starts each (interleaved), "
              f"cpu ({torch.get_num_threads()} threads)")
        print(f"| workers start from | first batch, s | {args.steps} batches, s |\n|---|---|---|")
        for row in rows:
            print(f"| {row['workers from']} | {row['first']:.2f} | {row['whole']:.2f} |")
        for row in rows:
            if "server start" in row:
                print(f"the fork server's own start (once per process, during the trainer's setup): "
                      f"{row['server start']:.2f} s including its first loader's first batch")
        return {"loader_start": rows}
    rates = {"loader only": loader_rate(stream, config.data.workers, args.steps)}
    device = torch.cuda.get_device_name() if accelerator.device.type == "cuda" else (
        f"cpu ({torch.get_num_threads()} threads)")
    where = "device" if stream.decode_on_device else "workers"
    if args.loader_only:
        print(f"loader: {plan.local_batch} samples per batch, {config.data.image_size}px, decode in {where}, "
              f"{config.data.workers} worker(s), {args.steps} batches")
        print(f"| loader only | {rates['loader only']:.1f} |")
        return {"rates": rates}

    from rsc_dist.data.streams import DevicePrefetch  # here: --augment-only also runs against older checkouts

    network, method = build_training_model(config, plan.manifest.num_classes, accelerator,
                                           capacity=plan.local_forward_batch, num_domains=len(plan.domains),
                                           source_domains=plan.source_indices)
    optimizer = optim.build_optimizer(config.optim, method.parameter_groups(network))
    scheduler = optim.build_scheduler(config.schedule, optimizer, 10**9)
    model, optimizer = accelerator.prepare(network, optimizer)
    trained = Trainables(model, network, optimizer, scheduler, method)
    stream.set_position(0, 0)
    from_shards = iter(DevicePrefetch(make_loader(stream, config.data.workers, accelerator.device.type == "cuda"),
                                      accelerator.device))  # as the trainer: batch i+1 issued before step i
    rates["train, from shards"] = training_rate(accelerator, trained, config,
                                                from_shards, args.steps)
    first = next(iter(make_loader(stream, 0, False)))
    pixels = prepare_batch(config, first, accelerator.device).pixels
    synthetic_batch = {"image": pixels, "label": first["label"]}  # decoded and augmented already
    synthetic = iter(lambda: synthetic_batch, None)
    rates["train, synthetic in memory"] = training_rate(accelerator, trained, config,
                                                        synthetic, args.steps)
    fed = rates["train, from shards"] / rates["train, synthetic in memory"]
    print(f"{config.model.arch} {config.algorithm} at {config.data.image_size}px, batch {plan.local_forward_batch}, "
          f"{config.data.workers} loader worker(s), decode in {where}, {args.steps} steps, device {device}")
    print("| measurement | img/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} |")
    print(f"fed fraction (from shards / synthetic): {fed:.3f}")
    result = {"rates": rates, "fed_fraction": fed}
    if stream.decode_on_device:
        stats = device_path_stats(stream, accelerator.device, batches=max(3, min(6, args.steps)))
        print(f"device path: {stats['ops per batch']} aten ops per batch, {stats['host ms per batch']:.2f} ms host "
              f"time per batch; jpeg decoder: {stats['jpeg decoder']}")
        result["device_path"] = stats
    return result


if __name__ == "__main__":
    main()
