"""Per-rank webdataset streams for training and evaluation.

Design rules (../shared/design.md, "Distributed rules"):
- Loaders are never handed to ``accelerator.prepare`` (Accelerate would dispatch an iterable
  dataset from rank 0 only); batches are moved to the device by the trainer.
- Every rank runs the same number of steps: each (rank, worker) unit reads its part of a
  deterministically shuffled shard list and cycles it, so uneven shards cannot end one rank
  early. With fewer shards than units, units split at the sample level instead.
- Batch ``i`` of an epoch is a pure function of (seed, epoch, rank, i): shard order, shuffle
  buffers and each sample's augmentation are seeded from those numbers. Resuming mid-epoch
  therefore skips the raw (undecoded) samples of the batches already trained on, and the
  rest of the epoch is the same as in an uninterrupted run.
- Workers decode to uint8 and augment on uint8 (about 2x the rate of float PIL pipelines,
  ../shared/gpu-anchors.md); the trainer normalizes on the device.
- Evaluation reads every sample exactly once across ranks and workers; counts are reduced.
"""

from __future__ import annotations

import functools
import random
import signal
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from webdataset.filters import _shuffle as shuffle_buffered
from webdataset.tariterators import tarfile_samples

IMAGE_FIELDS = ("jpg", "png", "webp", "jpeg")

# torchvision 0.29 deprecates torchvision.io decoding in favour of TorchCodec, but still ships
# it (and it is what data_prep verifies shards against); keep the warning out of every worker.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


def mix_seed(*numbers: int) -> int:
    """A fixed, platform-independent 63-bit mix of integers (no Python ``hash``)."""
    value = 0x9E3779B97F4A7C15
    for number in numbers:
        value = (value ^ (int(number) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) % (2**64)
        value = (value * 0xBF58476D1CE4E5B9) % (2**64)
    return value % (2**63)


@dataclass(frozen=True)
class Unit:
    """What one (rank, worker) unit reads: its shard files, and which of their samples."""

    urls: tuple[str, ...]
    modulo: int = 1  # keep samples whose running index % modulo == residue
    residue: int = 0


def split_shards(urls: list[str], unit: int, num_units: int) -> Unit:
    """Shard-level split when there are enough shards, sample-level split otherwise."""
    if len(urls) >= num_units:
        return Unit(tuple(urls[unit::num_units]))
    return Unit(tuple(urls), modulo=num_units, residue=unit)


def epoch_shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The same shuffled order on every rank (seeded by run seed and epoch)."""
    ordered = sorted(urls)
    random.Random(mix_seed(seed, epoch)).shuffle(ordered)
    return ordered


def read_samples(unit: Unit) -> Iterator[dict]:
    """Raw samples (undecoded bytes) of a unit, in file order."""
    for index, sample in enumerate(tarfile_samples({"url": url} for url in unit.urls)):
        if index % unit.modulo == unit.residue:
            yield sample


def endless_samples(unit: Unit, *, seed: int, shuffle_buffer: int) -> Iterator[dict]:
    """A unit's samples, shuffled through a seeded buffer, cycled forever (pass after pass)."""
    if not unit.urls:
        raise ValueError("a training unit has no shard to read")
    for pass_index in range(2**62):
        produced = False
        stream = read_samples(unit)
        if shuffle_buffer > 1:
            stream = shuffle_buffered(
                stream, bufsize=shuffle_buffer, initial=shuffle_buffer, seed=mix_seed(seed, pass_index)
            )
        for sample in stream:
            produced = True
            yield sample
        if not produced:
            raise ValueError(f"no samples in shards {list(unit.urls)[:3]}... for this unit")


def decode_sample(sample: dict) -> tuple[torch.Tensor, int, int]:
    """uint8 (3, H, W) RGB image, class index, domain index."""
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image field")
    data = torch.frombuffer(bytearray(sample[field]), dtype=torch.uint8)
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as exc:
        raise ValueError(f"cannot decode {sample.get('__key__')}.{field} in {sample.get('__url__')}: {exc}") from exc
    return image, int(sample["cls"]), int(sample["dom"])


@dataclass(frozen=True)
class Augment:
    image_size: int
    crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: bool = True
    color_jitter: float = 0.4
    grayscale: float = 0.1

    def train_transform(self) -> v2.Compose:
        steps = [v2.RandomResizedCrop(self.image_size, scale=self.crop_scale, antialias=True)]
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if self.color_jitter > 0:
            j = self.color_jitter
            steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j)))
        if self.grayscale > 0:
            steps.append(v2.RandomGrayscale(self.grayscale))
        return v2.Compose(steps)

    def eval_transform(self) -> v2.Resize:
        return v2.Resize((self.image_size, self.image_size), antialias=True)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(IterableDataset):
    """Yields the training batches of one rank for one epoch, from ``start_step`` on.

    ``groups`` maps a group name to its shard files: one group ("merged" sampling, the released
    code) or one per source domain ("balanced", DomainBed: ``batch_per_group`` from each).
    """

    def __init__(self, groups: dict[str, list[str]], *, batch_per_group: int, steps_per_epoch: int,
                 seed: int, rank: int, world_size: int, augment: Augment, shuffle_buffer: int):
        self.groups = {name: sorted(urls) for name, urls in groups.items()}
        self.batch_per_group = batch_per_group
        self.steps_per_epoch = steps_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.augment = augment
        self.shuffle_buffer = shuffle_buffer
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        """Call before iterating (workers are forked at iteration and copy this)."""
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        worker, num_workers = _worker()
        # Loader workers hand out batches round-robin starting at worker 0; rotating the
        # logical id keeps batch i on the same logical stream when resuming at any step.
        logical = (worker + self.start_step) % num_workers
        unit = self.rank * num_workers + logical
        units_total = self.world_size * num_workers
        streams = []
        for name, urls in self.groups.items():
            order = epoch_shard_order(urls, self.seed, self.epoch)
            stream = endless_samples(
                split_shards(order, unit, units_total),
                seed=mix_seed(self.seed, self.epoch, unit, len(streams)),
                shuffle_buffer=self.shuffle_buffer,
            )
            # Skip (without decoding) what this logical stream produced before start_step.
            done = len(range(logical, self.start_step, num_workers)) * self.batch_per_group
            for _ in range(done):
                next(stream)
            streams.append(stream)
        transform = self.augment.train_transform()
        first = self.start_step + (logical - self.start_step) % num_workers
        for batch_index in range(first, self.steps_per_epoch, num_workers):
            images, labels, domains = [], [], []
            for stream in streams:
                for _ in range(self.batch_per_group):
                    image, label, domain = decode_sample(next(stream))
                    position = len(images)
                    # Augmentation is seeded by the sample's position, not by worker state.
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(mix_seed(self.seed, self.epoch, self.rank, batch_index, position))
                        images.append(transform(image))
                    labels.append(label)
                    domains.append(domain)
            yield {
                "image": torch.stack(images),
                "label": torch.tensor(labels, dtype=torch.long),
                "domain": torch.tensor(domains, dtype=torch.long),
                "step": batch_index,
            }


class EvalStream(IterableDataset):
    """Evaluation batches of one rank: every sample of ``urls`` read by exactly one unit."""

    def __init__(self, urls: list[str], *, rank: int, world_size: int, augment: Augment, batch_size: int):
        self.urls = sorted(urls)
        self.rank, self.world_size = rank, world_size
        self.augment, self.batch_size = augment, batch_size

    def __iter__(self):
        worker, num_workers = _worker()
        unit = split_shards(self.urls, self.rank * num_workers + worker, self.world_size * num_workers)
        transform = self.augment.eval_transform()
        batch = []
        for sample in read_samples(unit):
            batch.append(decode_sample(sample))
            if len(batch) == self.batch_size:
                yield _collate(batch, transform)
                batch = []
        if batch:
            yield _collate(batch, transform)


def _collate(decoded, transform) -> dict:
    return {
        "image": torch.stack([transform(image) for image, _, _ in decoded]),
        "label": torch.tensor([label for _, label, _ in decoded], dtype=torch.long),
        "domain": torch.tensor([domain for _, _, domain in decoded], dtype=torch.long),
    }


def _ignore_stop_signals(worker_id: int) -> None:
    # Schedulers signal every process of a job; a worker killed by SIGTERM/SIGUSR1 would abort
    # the step. The main process handles the signal and shuts its workers down itself.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def make_loader(dataset: IterableDataset, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        # Its own generator: drawing worker seeds from the global RNG would shift the training
        # RNG (dropout) after a mid-epoch resume. Worker randomness is seeded per sample anyway.
        generator=torch.Generator().manual_seed(0),
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )


@functools.lru_cache(maxsize=8)
def _scaled_mean_std(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: building them every step would be a blocking host-to-device copy.
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).mul(255).to(device)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).mul(255).to(device)
    return mean_t, std_t


def normalize_on_device(images: torch.Tensor, mean, std, *, channels_last: bool) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalized float32, on whatever device ``images`` is."""
    mean_t, std_t = _scaled_mean_std(tuple(mean), tuple(std), images.device)
    images = (images.float() - mean_t) / std_t
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images
