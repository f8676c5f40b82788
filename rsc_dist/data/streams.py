"""Training and evaluation batches from webdataset shards (docs/architecture.md, "Sample order").

Rules:
- Loaders are never handed to ``accelerator.prepare`` (Accelerate would dispatch an iterable
  dataset from rank 0 only); batches are moved to the device by the trainer.
- Training batch i of an epoch is rank r's slice of GLOBAL batch i (rsc_dist.order): the same
  global batches for any number of ranks and loader workers. A worker builds whole batches
  (worker k of K builds batches start+k, start+k+K, ...: the loader's round-robin order), reading
  just the samples of its batch by their byte offsets (manifest v2; scanned from the tar headers
  for older manifests), sorted by position in the shard and merged into one read where they
  are adjacent. Each sample's augmentation is seeded by (seed, group, epoch, position in the
  group's sequence): never by rank or worker.
- Every rank runs the same number of steps (the plan's steps_per_epoch), whatever the shards.
- Evaluation reads every sample exactly once across ranks and workers; counts are reduced.
- Bad data stops the run with a DataError naming the shard and sample (never skipped
  silently); ``python -m data_prep verify --decode`` is the deep check before a run.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import signal
import sys
from collections import OrderedDict
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tarfile_samples

from data_prep.images import MAX_PIXELS, check_pixels, decode_rgb
from data_prep.tarshard import parse_sample_span, scan_sample_offsets
from rsc_dist.core.errors import UsageError
from rsc_dist.core.seeding import mix_seed
from rsc_dist.data.augment import Augment, augment_batch, augment_one, decode_batch, draw_params, eval_resize, is_jpeg
from rsc_dist.data.order import GroupOrder, ShardRef, rank_slice

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


class DataError(UsageError):
    """A shard or sample that cannot be used; the message names the file and the sample."""


def error_line(exc: BaseException) -> str:
    """An error's own message on one line, also when a loader worker raised it: the loader
    re-raises it with the worker's traceback in the text, the original message last."""
    text = str(exc).strip() or type(exc).__name__
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split("Error: ", 1)[1] if "Error: " in last else last
    return text


# ---------------------------------------------------------------------------------------------
# Reading samples by offset


class ShardReader:
    """Reads samples of training shards by byte range; keeps a few files open (per worker)."""

    def __init__(self, max_open: int = 32):
        self._files: OrderedDict[str, int] = OrderedDict()
        self._offsets: dict[str, tuple[int, ...]] = {}
        self.max_open = max_open

    def _fd(self, path: str) -> int:
        fd = self._files.pop(path, None)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"cannot open shard {path}: {exc.strerror}") from None
            if len(self._files) >= self.max_open:
                os.close(self._files.popitem(last=False)[1])
        self._files[path] = fd
        return fd

    def offsets(self, shard: ShardRef) -> tuple[int, ...]:
        if shard.sample_offsets is not None:
            return shard.sample_offsets
        found = self._offsets.get(shard.path)
        if found is None:  # a version-1 manifest: scan the tar headers once per worker
            try:
                found = tuple(scan_sample_offsets(shard.path))
            except Exception as exc:
                raise DataError(f"shard {shard.path}: cannot index its samples: {exc}") from None
            if len(found) != shard.num_samples + 1:
                raise DataError(f"shard {shard.path} holds {len(found) - 1} samples; the manifest says "
                                f"{shard.num_samples} (rerun data_prep convert)")
            self._offsets[shard.path] = found
        return found

    def read(self, shard: ShardRef, indices: list[int]) -> dict[int, dict]:
        """{sample index: raw sample} for ``indices`` of one shard; adjacent samples in one read."""
        offsets = self.offsets(shard)
        fd = self._fd(shard.path)
        wanted = sorted(set(indices))
        samples = {}
        run_start = 0
        for i in range(1, len(wanted) + 1):
            if i < len(wanted) and wanted[i] == wanted[i - 1] + 1:
                continue
            first, last = wanted[run_start], wanted[i - 1]
            begin, end = offsets[first], offsets[last + 1]
            data = os.pread(fd, end - begin, begin)
            if len(data) != end - begin:
                raise DataError(f"shard {shard.path} is cut short: samples {first}..{last} need bytes "
                                f"{begin}..{end}, the file ends at {os.fstat(fd).st_size}")
            for index in range(first, last + 1):
                span = data[offsets[index] - begin:offsets[index + 1] - begin]
                try:
                    samples[index] = parse_sample_span(span)
                except ValueError as exc:
                    raise DataError(f"shard {shard.path}, sample {index}: {exc}") from None
                samples[index]["__url__"] = shard.path
            run_start = i
        return samples


def _where(sample: dict) -> str:
    return f"sample {sample.get('__key__')} in {sample.get('__url__')}"


def image_bytes(sample: dict) -> bytes:
    """The sample's encoded image, after a header-only pixel-count check (no decompression bombs)."""
    field = next((f for f in IMAGE_FIELDS if f in sample), None)
    if field is None:
        raise DataError(f"{_where(sample)} has no image field (one of {IMAGE_FIELDS})")
    try:
        check_pixels(sample[field], MAX_PIXELS)
    except ValueError as exc:
        raise DataError(f"{_where(sample)}: cannot decode: {exc}") from None
    return sample[field]


def labels_of(sample: dict) -> tuple[int, int]:
    try:
        return int(sample["cls"]), int(sample["dom"])
    except (KeyError, ValueError) as exc:
        raise DataError(f"{_where(sample)}: bad or missing class/domain field: {exc}") from None


def decode_checked(sample: dict, data: bytes) -> torch.Tensor:
    """uint8 (3, H, W) RGB from ``data`` = image_bytes(sample) (already pixel-checked)."""
    try:
        return decode_rgb(data)
    except (ValueError, RuntimeError) as exc:
        raise DataError(f"{_where(sample)}: cannot decode: {exc}") from None


def decode_sample(sample: dict) -> tuple[torch.Tensor, int, int]:
    """uint8 (3, H, W) RGB image, class index, domain index; DataError naming the sample."""
    return (decode_checked(sample, image_bytes(sample)), *labels_of(sample))


def device_images(batch: dict, device) -> torch.Tensor:
    """The device path's images: the batch's JPEGs decoded on ``device`` in one call, then
    augmented there with the parameters the loader worker drew (same pixels as the worker path)."""
    try:
        decoded = decode_batch(batch["encoded"], device)
    except (RuntimeError, ValueError) as exc:  # find the culprit, one by one on the CPU
        for key, item in zip(batch["keys"], batch["encoded"]):
            if item.ndim == 1:
                try:
                    decode_rgb(item)
                except ValueError as reason:
                    raise DataError(f"sample {key}: cannot decode: {reason}") from None
        raise DataError(f"batch of samples {batch['keys'][:3]}...: cannot decode on {device}: {exc}") from None
    return augment_batch(decoded, batch["params"])  # parameters stay on the CPU: they steer Python


class DevicePrefetch:
    """The loader's batches with the device path's decode + augmentation of batch i+1 issued
    before batch i is handed out, so that they run while step i computes.

    Batches of the device path (with ``params``) come out as worker-path batches (``image``
    uint8 on ``device``). On CUDA the work is issued on a side stream; the consumer's stream
    waits for that batch's event only (not for the next batch's work queued behind it), and
    ``record_stream`` keeps the images' memory from being reused while the consumer's stream
    still reads them. Elsewhere the same code runs in order. A data error of batch i+1 is
    raised when batch i+1 is asked for, not earlier.
    """

    def __init__(self, batches, device):
        self.batches, self.device = batches, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _issue(self, batch: dict) -> tuple[dict, object]:
        if "params" not in batch:
            return batch, None
        try:
            if self.stream is None:
                images = device_images(batch, self.device)
            else:
                with torch.cuda.stream(self.stream):
                    images = device_images(batch, self.device)
                ready = torch.cuda.Event()
                ready.record(self.stream)
                images = (images, ready)
        except DataError as exc:
            return batch, exc
        rest = {key: value for key, value in batch.items() if key not in ("encoded", "params", "keys")}
        return rest, images

    def _hand_out(self, batch: dict, images) -> dict:
        if isinstance(images, BaseException):
            raise images
        if images is None:
            return batch
        if self.stream is not None:
            images, ready = images
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(ready)
            images.record_stream(consumer)
        return {**batch, "image": images}

    def __iter__(self):
        pending = None
        for batch in self.batches:
            issued = self._issue(batch)  # batch i+1's work is queued before batch i is used
            if pending is not None:
                yield self._hand_out(*pending)
            pending = issued
        if pending is not None:
            yield self._hand_out(*pending)


# ---------------------------------------------------------------------------------------------
# Training


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(IterableDataset):
    """The training batches of one rank for one epoch, from ``start_step`` on.

    ``groups`` are the sampling groups' shards, in group order; each step takes
    ``global_batch_per_group`` samples from every group's sequence across all ranks.
    """

    def __init__(self, groups: list[list[ShardRef]], *, global_batch_per_group: int, steps_per_epoch: int,
                 seed: int, rank: int, world_size: int, augment: Augment, block_shards: int,
                 decode_on_device: bool = False):
        self.groups = [list(shards) for shards in groups]
        self.global_batch_per_group = global_batch_per_group
        self.steps_per_epoch = steps_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.augment = augment
        self.block_shards = block_shards
        self.decode_on_device = decode_on_device
        self.epoch, self.start_step = 0, 0
        self._orders = None
        self._reader = None

    def __getstate__(self) -> dict:
        # What a worker receives (pickled: workers start from the fork server). The reader's
        # file descriptors belong to this process; the orders are rebuilt from the shards.
        return {**self.__dict__, "_reader": None, "_orders": None}

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        """Call before iterating (the workers started at iteration receive a copy of this)."""
        self.epoch, self.start_step = epoch, start_step

    def orders(self) -> list[GroupOrder]:
        if self._orders is None:
            self._orders = [GroupOrder(shards, seed=self.seed, group=g, block_shards=self.block_shards)
                            for g, shards in enumerate(self.groups)]
        return self._orders

    def __iter__(self):
        worker, num_workers = _worker()
        for step in range(self.start_step + worker, self.steps_per_epoch, num_workers):
            yield self.batch(step)

    def batch(self, step: int) -> dict:
        if self._reader is None:
            self._reader = ShardReader()
        share = rank_slice(step, self.rank, self.world_size, self.global_batch_per_group, len(self.groups))
        images, params, keys, labels, domains, ids, places = [], [], [], [], [], [], []
        step_start = step * self.global_batch_per_group
        for group, (order, positions) in enumerate(zip(self.orders(), share.positions)):
            located = order.locate(self.epoch, positions)
            by_shard: dict[int, list[int]] = {}
            for shard, index in located:
                by_shard.setdefault(shard, []).append(index)
            raw = {shard: self._reader.read(order.shards[shard], indices) for shard, indices in by_shard.items()}
            for position, (shard, index) in zip(positions, located):
                sample = raw[shard][index]
                seed = mix_seed(self.seed, group, self.epoch, position)
                ids.append(seed)
                places.append(group * self.global_batch_per_group + position - step_start)
                data = image_bytes(sample)
                if self.decode_on_device and is_jpeg(data):
                    # Only the header is read here; the pixels are decoded on the device.
                    width, height = check_pixels(data)
                    images.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                    params.append(draw_params(self.augment, height, width, seed))
                else:  # PNG/WebP in device mode are decoded here and join the batch decoded
                    image = decode_checked(sample, data)
                    row = draw_params(self.augment, image.shape[-2], image.shape[-1], seed)
                    images.append(image if self.decode_on_device else augment_one(image, row))
                    params.append(row)
                keys.append(f"{sample.get('__key__')} in {sample.get('__url__')}")
                label, domain = labels_of(sample)
                labels.append(label)
                domains.append(domain)
        # sample_id: the sample's identity in the global order (its augmentation seed); RSC's
        # random-score ablation seeds from it, so it too is independent of the rank layout.
        # order: its place in this step's global batch (group, then position in the group's
        # share), which methods defined on the global batch's order use (docs/method.md).
        batch = {"label": torch.tensor(labels, dtype=torch.long),
                 "domain": torch.tensor(domains, dtype=torch.long),
                 "sample_id": torch.tensor(ids, dtype=torch.int64), "step": step,
                 "order": torch.tensor(places, dtype=torch.int64),
                 "order_span": self.global_batch_per_group * len(self.groups)}
        if self.decode_on_device:
            batch.update(encoded=images, params=torch.stack(params), keys=keys)
        else:
            batch["image"] = torch.stack(images)
        return batch


# ---------------------------------------------------------------------------------------------
# Evaluation


def split_shards(urls: list[str], unit: int, num_units: int) -> tuple[tuple[str, ...], int, int]:
    """(shards, modulo, residue) one (rank, worker) unit reads: whole shards when there are
    enough of them, every ``modulo``-th sample of all shards otherwise."""
    if len(urls) >= num_units:
        return tuple(urls[unit::num_units]), 1, 0
    return tuple(urls), num_units, unit


class EvalStream(IterableDataset):
    """Evaluation batches of one rank: every sample of ``urls`` read by exactly one unit, in
    file order (sequential reads)."""

    def __init__(self, urls: list[str], *, rank: int, world_size: int, augment: Augment, batch_size: int,
                 selection: dict[str, frozenset[int]] | None = None):
        """``selection``: {shard path: indices of its samples to evaluate} (a holdout split,
        rsc_dist.data.holdout); None: every sample."""
        self.urls = sorted(urls)
        self.rank, self.world_size = rank, world_size
        self.augment, self.batch_size = augment, batch_size
        self.selection = selection

    def __iter__(self):
        worker, num_workers = _worker()
        urls, modulo, residue = split_shards(self.urls, self.rank * num_workers + worker,
                                             self.world_size * num_workers)
        batch = []
        for index, sample in enumerate(_selected(_read_sequential(urls), self.selection)):
            if index % modulo != residue:
                continue
            batch.append(decode_sample(sample))
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch = []
        if batch:
            yield self._collate(batch)

    def _collate(self, decoded) -> dict:
        return {
            "image": eval_resize([image for image, _, _ in decoded], self.augment.image_size),
            "label": torch.tensor([label for _, label, _ in decoded], dtype=torch.long),
            "domain": torch.tensor([domain for _, _, domain in decoded], dtype=torch.long),
        }


def _selected(samples: Iterator[dict], selection: dict[str, frozenset[int]] | None) -> Iterator[dict]:
    """The samples whose index in their shard (counted in file order) ``selection`` lists for
    that shard; all of them without a selection."""
    if selection is None:
        yield from samples
        return
    url, index = None, 0
    for sample in samples:
        if sample.get("__url__") != url:
            url, index = sample.get("__url__"), 0
        if index in selection[url]:
            yield sample
        index += 1


def _read_sequential(urls) -> Iterator[dict]:
    def fail(exc, *_):  # webdataset's handler: stop with the shard named, never skip
        raise DataError(f"cannot read evaluation shards {list(urls)[:3]}: {exc}") from None

    return tarfile_samples([{"url": url} for url in urls], handler=fail)


# ---------------------------------------------------------------------------------------------
# Loaders

# Loader workers start from a fork server, never by forking the training process. A training
# process has threads (W&B's, tqdm's monitor, a C++ thread entering Python through the GIL API):
# a worker forked while one of them held CPython's runtime lock (HEAD_LOCK: taken to create or
# delete a thread state) inherits it locked and blocks forever in PyOS_AfterFork_Child
# (CPython gh-112275, fixed only from 3.11.10 on; tests/test_loader_start.py reproduces it).
# The server is started with fork+exec (no Python runs in the child before exec) and forks
# workers from its own single thread. Measured start-up costs: BENCHMARKS.md, "Loader workers".
WORKER_START_METHOD = "forkserver"
# Signals a job sends to every process of the group. Blocked in the fork server (and so in every
# worker it forks, from the first instruction); a worker ignores them for good in _worker_init.
# The training process handles them and stops its workers itself.
HELD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

_PR_SET_PDEATHSIG = 1
_REAPER_INSTALLED = False


def worker_context():
    """The multiprocessing context every loader of a run starts its workers in."""
    return multiprocessing.get_context(WORKER_START_METHOD)


def start_worker_server() -> None:
    """Start the fork server the loader workers come from (later calls do nothing while it runs),
    importing every rsc_dist module this process has imported and the main module, so that a
    worker starts without importing anything.

    The trainer calls it during setup, so that the imports overlap the model's construction;
    ``make_loader`` calls it otherwise. The server is a child of this process: it exits when
    this process does (it watches a pipe), and each worker is killed with it (_worker_init).
    As with multiprocessing's spawn, each worker imports the main module again: a script that
    calls ``rsc_dist.train.main()`` needs the ``if __name__ == "__main__":`` guard.
    """
    from multiprocessing import forkserver, resource_tracker

    loaded = sorted(name for name in sys.modules if name == "rsc_dist" or name.startswith("rsc_dist."))
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    main_module = [main_spec.name] if main_spec is not None and main_spec.name != "__main__" else []
    forkserver.set_forkserver_preload(list(dict.fromkeys([__name__, *loaded, *main_module])))
    # The resource tracker is started first, on its own: starting it unblocks SIGINT and SIGTERM
    # in this process (multiprocessing.resource_tracker), which would undo the mask below.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        forkserver.ensure_running()  # the server inherits the blocked mask through exec
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_init(worker_id: int) -> None:
    # Schedulers signal every process of a job; a worker killed by SIGTERM/SIGUSR1 would abort
    # the step the ranks are about to agree on. The training process handles the signal and
    # shuts its workers down itself. So that an ignored SIGTERM can never keep a worker alive
    # after its training process is gone (crash, os._exit, kill -9), the kernel kills the
    # worker when its parent, the fork server, dies: the server exits as soon as the training
    # process is gone.
    for sig in HELD_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _release_fork_server()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the loader's own parent watchdog remains
        pass
    if os.getppid() == 1:  # the server died before prctl took effect: nobody is left to kill us
        os._exit(1)


def _release_fork_server() -> None:
    """Close this worker's copy of the pipe whose other end keeps the fork server alive.

    multiprocessing gives every process the server starts that pipe's write end (so that it
    could start processes of its own), and the server runs until every copy is closed. A
    worker holding it would keep the server alive after the training process died (kill -9),
    and the server keeps the worker alive (torch's worker watchdog watches its parent, the
    server): both would run forever. Without the copy, the server exits with the training
    process and its workers die with the server (PR_SET_PDEATHSIG below).
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None


def _kill_loader_workers() -> None:
    # Registered after multiprocessing's own exit hook, so it runs first (atexit is LIFO). That
    # hook terminates daemonic children with SIGTERM, which loader workers ignore, and then
    # joins them: a run that died with a loader still open (a data error raised from a worker)
    # would wait at exit forever. SIGKILL cannot be ignored.
    # The loader's SIGCHLD handler would report each kill as "DataLoader worker ... is killed by
    # signal" with a traceback, after the run's own error line.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def make_loader(dataset: IterableDataset, workers: int, pin_memory: bool) -> DataLoader:
    """A loader of ``dataset`` (batches as the dataset yields them), its workers started from the
    fork server (start_worker_server) for every iteration."""
    global _REAPER_INSTALLED
    if workers > 0:
        start_worker_server()
        if not _REAPER_INSTALLED:
            atexit.register(_kill_loader_workers)
            _REAPER_INSTALLED = True
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        worker_init_fn=_worker_init if workers > 0 else None,
        multiprocessing_context=worker_context() if workers > 0 else None,
        # Its own generator: drawing worker seeds from the global RNG would shift the training
        # RNG (dropout) after a mid-epoch resume. Worker randomness is seeded per sample anyway.
        generator=torch.Generator().manual_seed(0),
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )


def check_shard_sizes(shards: list[ShardRef]) -> None:
    """Cheap integrity check at start: every shard exists with the size the manifest gives."""
    for shard in shards:
        try:
            size = os.stat(shard.path).st_size
        except OSError as exc:
            raise DataError(f"shard {shard.path}: {exc.strerror}; rerun data_prep convert or check data.root") from None
        if size != shard.num_bytes:
            raise DataError(f"shard {shard.path} is {size} bytes; the manifest says {shard.num_bytes} "
                            f"({'truncated' if size < shard.num_bytes else 'changed'} since conversion: "
                            "rerun data_prep convert, or data_prep verify to see more)")


# ---------------------------------------------------------------------------------------------
# On the device


_MEAN_STD_CACHE: dict = {}


def normalize_on_device(images: torch.Tensor, mean, std, *, channels_last: bool) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalized float32, on whatever device ``images`` is."""
    key = (tuple(mean), tuple(std), images.device)
    if key not in _MEAN_STD_CACHE:
        # Made once per device: building them every step would be a blocking host-to-device copy.
        _MEAN_STD_CACHE[key] = tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).mul(255).to(images.device)
                                     for v in (mean, std))
    mean_t, std_t = _MEAN_STD_CACHE[key]
    images = (images.float() - mean_t) / std_t
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images
