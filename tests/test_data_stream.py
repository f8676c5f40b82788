"""Per-rank streams: deterministic, resumable mid-epoch, equal step counts, exact evaluation."""

from collections import Counter

import pytest
import torch

from data_prep.manifest import load_manifest
from rsc_dist import data
from rsc_dist.data import Augment, EvalStream, TrainStream, make_loader
from trainer_fixtures import tiny_shards  # noqa: F401  (fixture)

AUGMENT = Augment(24, (0.7, 1.0), True, 0.3, 0.1)


def _train_urls(shards, domains=("cartoon", "painting", "photo")):
    manifest = load_manifest(shards)
    return {d: [str(p) for p in manifest.shard_paths(d, "train")] for d in domains}


def _stream(shards, *, rank=0, world=1, steps=6, balanced=False, batch=4):
    urls = _train_urls(shards)
    groups = urls if balanced else {"merged": [u for v in urls.values() for u in v]}
    return TrainStream(groups, batch_per_group=batch, steps_per_epoch=steps, seed=3, rank=rank,
                       world_size=world, augment=AUGMENT, shuffle_buffer=8)


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


def test_epochs_and_ranks_differ_and_runs_repeat(tiny_shards):
    epoch0 = _batches(_stream(tiny_shards), 0, 0, 0)
    again = _batches(_stream(tiny_shards), 0, 0, 0)
    epoch1 = _batches(_stream(tiny_shards), 1, 0, 0)
    rank1 = _batches(_stream(tiny_shards, rank=1, world=2), 0, 0, 0)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(epoch0, again))
    assert not torch.equal(epoch0[0]["image"], epoch1[0]["image"])
    assert not torch.equal(epoch0[0]["image"], rank1[0]["image"])


def test_balanced_batches_hold_each_domain_equally(tiny_shards):
    for batch in _batches(_stream(tiny_shards, balanced=True, batch=3), 0, 0, 0):
        assert sorted(Counter(batch["domain"].tolist()).values()) == [3, 3, 3]


def test_uneven_shards_give_every_rank_the_same_steps(tiny_shards):
    """Shard sizes are uneven (13 per shard, remainders); 2 and 3 ranks; more steps than data."""
    for world in (2, 3):
        counts = [len(_batches(_stream(tiny_shards, rank=r, world=world, steps=40), 0, 0, 2))
                  for r in range(world)]
        assert counts == [40] * world


def test_skipped_batches_are_not_decoded(tiny_shards, monkeypatch):
    decoded = []
    real = data.decode_sample
    monkeypatch.setattr(data, "decode_sample", lambda s: decoded.append(s["__key__"]) or real(s))
    _batches(_stream(tiny_shards, steps=6, batch=4), epoch=0, start=4, workers=0)
    assert len(decoded) == 2 * 4  # only the two remaining batches


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
    assert all(unit.urls == tuple(urls) and unit.modulo == 5 for unit in units)
    assert sorted(unit.residue for unit in units) == list(range(5))
    shard_units = [data.split_shards(urls * 2, u, 3) for u in range(3)]
    assert sorted(sum((list(u.urls) for u in shard_units), [])) == sorted(urls * 2)


def test_normalize_on_device():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = data.normalize_on_device(images, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), channels_last=True)
    assert torch.allclose(out, torch.ones_like(out)) and out.is_contiguous(memory_format=torch.channels_last)
