"""Training and evaluation streams: the same global batches for any number of ranks and
workers, resumable mid-epoch without reading skipped data, exact evaluation, bad data named."""

import shutil
from collections import Counter

import pytest
import torch

from data_prep.manifest import load_manifest
from rsc_dist.data import streams as data
from rsc_dist.data.augment import Augment
from rsc_dist.data.order import ShardRef
from rsc_dist.data.streams import DataError, EvalStream, TrainStream, check_shard_sizes, make_loader

AUGMENT = Augment(24, (0.7, 1.0), True, 0.3, 0.1)
SOURCES = ("cartoon", "painting", "photo")


def _refs(shards, domains=SOURCES, split="train"):
    manifest = load_manifest(shards)
    return sorted((ShardRef(str(manifest.root / s.file), s.num_samples, s.num_bytes, s.sample_offsets)
                   for d in domains for s in manifest.shards(d, split)), key=lambda r: r.path)


def _stream(shards, *, rank=0, world=1, steps=6, balanced=False, global_batch=8, block=2):
    groups = [_refs(shards, (d,)) for d in SOURCES] if balanced else [_refs(shards)]
    return TrainStream(groups, global_batch_per_group=global_batch, steps_per_epoch=steps, seed=3,
                       rank=rank, world_size=world, augment=AUGMENT, block_shards=block)


def _batches(stream, epoch, start, workers):
    stream.set_position(epoch, start)
    return list(make_loader(stream, workers, pin_memory=False))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("balanced", [False, True])
def test_resume_mid_epoch_repeats_the_rest_of_the_epoch(tiny_shards, workers, balanced):
    stream = _stream(tiny_shards, balanced=balanced)
    full = _batches(stream, epoch=1, start=0, workers=workers)
    assert [b["step"] for b in full] == list(range(6))
    for start in (1, 3, 4):
        resumed = _batches(stream, epoch=1, start=start, workers=workers)
        assert [b["step"] for b in resumed] == list(range(start, 6))
        for a, b in zip(full[start:], resumed):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


@pytest.mark.parametrize("balanced", [False, True])
def test_any_number_of_ranks_and_workers_sees_the_same_global_batches(tiny_shards, balanced):
    """Rank r of W trains on its slice of each global batch; the slices, in rank order, are the
    global batch one process trains on, pixel for pixel (augmentation is seeded per sample)."""
    single = _batches(_stream(tiny_shards, balanced=balanced, global_batch=8), 0, 0, workers=0)
    for world, workers in ((2, 0), (2, 2), (4, 1), (8, 3)):
        ranks = [_batches(_stream(tiny_shards, rank=r, world=world, balanced=balanced, global_batch=8), 0, 0,
                          workers) for r in range(world)]
        for step, whole in enumerate(single):
            parts = [ranks[r][step] for r in range(world)]
            if balanced:  # per rank: its slice of each domain's part; compare as multisets
                key = lambda b: sorted(zip(b["label"].tolist(), b["image"].flatten(1).sum(1).tolist()))
                assert sorted(sum((key(p) for p in parts), [])) == key(whole), (world, workers, step)
            else:
                assert torch.equal(torch.cat([p["image"] for p in parts]), whole["image"]), (world, workers, step)
                assert torch.equal(torch.cat([p["label"] for p in parts]), whole["label"])


def test_epochs_differ_and_runs_repeat(tiny_shards):
    epoch0 = _batches(_stream(tiny_shards), 0, 0, 0)
    again = _batches(_stream(tiny_shards), 0, 0, 0)
    epoch1 = _batches(_stream(tiny_shards), 1, 0, 0)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(epoch0, again))
    assert not torch.equal(epoch0[0]["image"], epoch1[0]["image"])


def test_balanced_batches_hold_each_domain_equally(tiny_shards):
    for batch in _batches(_stream(tiny_shards, balanced=True, global_batch=3), 0, 0, 0):
        assert sorted(Counter(batch["domain"].tolist()).values()) == [3, 3, 3]


def test_more_steps_than_data_cycle_through_new_passes(tiny_shards):
    total = sum(r.num_samples for r in _refs(tiny_shards))
    steps = total // 8 * 3 + 2  # three passes and a bit
    for world in (1, 2):
        counts = [len(_batches(_stream(tiny_shards, rank=r, world=world, steps=steps), 0, 0, 2)) for r in range(world)]
        assert counts == [steps] * world


def test_resuming_reads_and_decodes_nothing_that_was_skipped(tiny_shards, monkeypatch):
    decoded, read = [], []
    real_decode, real_read = data.decode_checked, data.ShardReader.read
    monkeypatch.setattr(data, "decode_checked", lambda s, d: decoded.append(s["__key__"]) or real_decode(s, d))
    monkeypatch.setattr(data.ShardReader, "read",
                        lambda self, shard, indices: read.extend(indices) or real_read(self, shard, indices))
    _batches(_stream(tiny_shards, steps=6, global_batch=4), epoch=0, start=4, workers=0)
    assert len(decoded) == 2 * 4 and len(read) == 2 * 4  # only the two remaining batches


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1)])
def test_evaluation_reads_every_sample_once(tiny_shards, world, workers):
    manifest = load_manifest(tiny_shards)
    urls = [str(p) for s in ("train", "val") for p in manifest.shard_paths("sketch", s)]
    seen = Counter()
    for rank in range(world):
        stream = EvalStream(urls, rank=rank, world_size=world, augment=AUGMENT, batch_size=5)
        for batch in make_loader(stream, workers, pin_memory=False):
            assert batch["image"].shape[1:] == (3, 24, 24) and batch["image"].dtype == torch.uint8
            seen.update(batch["domain"].tolist())
    assert seen == {manifest.domain_index("sketch"): manifest.num_samples("sketch")}


def test_sample_level_split_partitions_samples():
    urls = [f"shard{i}" for i in range(3)]
    units = [data.split_shards(urls, u, 5) for u in range(5)]  # fewer shards than units
    assert all(unit[0] == tuple(urls) and unit[1] == 5 for unit in units)
    assert sorted(unit[2] for unit in units) == list(range(5))
    shard_units = [data.split_shards(urls * 2, u, 3) for u in range(3)]
    assert sorted(sum((list(u[0]) for u in shard_units), [])) == sorted(urls * 2)


def test_a_truncated_shard_is_named_at_start_and_at_read_time(tiny_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    refs = _refs(copy)
    victim = refs[0].path
    with open(victim, "r+b") as handle:  # cut at a sample boundary: a stream reader would not notice
        handle.truncate(refs[0].sample_offsets[2] if refs[0].sample_offsets else 4096)
    with pytest.raises(DataError, match=f"{victim} is .* bytes; the manifest says"):
        check_shard_sizes(refs)
    with pytest.raises(DataError, match=f"shard {victim} is cut short"):
        data.ShardReader().read(refs[0], list(range(refs[0].num_samples)))


def test_a_corrupt_image_is_a_data_error_naming_shard_and_sample(tiny_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    ref = _refs(copy)[0]
    reader = data.ShardReader()
    sample = reader.read(ref, [0])[0]
    field = next(f for f in data.IMAGE_FIELDS if f in sample)
    start = ref.sample_offsets[0] + 512  # the image member's data follows its 512-byte header
    with open(ref.path, "r+b") as handle:
        handle.seek(start)
        handle.write(b"\0" * 64)  # destroy the image header
    broken = data.ShardReader().read(ref, [0])[0]
    with pytest.raises(DataError, match=rf"sample {broken['__key__']} in {ref.path}: cannot decode"):
        data.decode_sample(broken)
    assert field


def test_normalize_on_device():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = data.normalize_on_device(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), channels_last=True)
    assert torch.allclose(out, torch.ones_like(out)) and out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("workers", [0, 2])
def test_device_decode_path_equals_the_worker_path(tiny_shards, workers):
    """data.decode=device: workers send the JPEG bytes and the drawn parameters; decoding (one
    TorchCodec call per batch) and augmentation happen in the training process, here on the CPU.
    Same labels in the same order, and the same pixels as the worker path, bit for bit."""
    by_worker = _batches(_stream(tiny_shards, steps=4), 0, 0, workers)
    device_stream = _stream(tiny_shards, steps=4)
    device_stream.decode_on_device = True
    by_device = _batches(device_stream, 0, 0, workers)
    assert len(by_worker) == len(by_device) == 4
    for worker_batch, device_batch in zip(by_worker, by_device):
        assert "image" not in device_batch and all(item.ndim == 1 for item in device_batch["encoded"])
        assert torch.equal(worker_batch["label"], device_batch["label"])
        pixels = data.device_images(device_batch, "cpu")
        assert torch.equal(pixels, worker_batch["image"])


def test_device_path_names_a_corrupt_jpeg(tiny_shards):
    stream = _stream(tiny_shards, steps=1)
    stream.decode_on_device = True
    batch = stream.batch(0)
    broken = bytearray(batch["encoded"][2].numpy().tobytes())
    broken[200:] = b"\0" * (len(broken) - 200)
    batch["encoded"][2] = torch.frombuffer(broken, dtype=torch.uint8)
    with pytest.raises(DataError, match=rf"sample {batch['keys'][2].split(' in ')[0]} in .*: cannot decode"):
        data.device_images(batch, "cpu")
