"""The global sample order: the same global batches for any number of ranks and workers,
ImageNet-size planning without reading data, and positions computed from the step alone."""

import time
import tracemalloc
from collections import Counter

import pytest

from rsc_dist.data.order import GroupOrder, ShardRef, rank_slice

IMAGENET_SAMPLES, IMAGENET_SHARDS = 1_281_167, 1_252


def _shards(total, count):
    base, extra = divmod(total, count)
    return [ShardRef(f"s{i:06d}.tar", base + (i < extra), 0) for i in range(count)]


def _global_batch(order, epoch, step, batch):
    return order.locate(epoch, range(step * batch, (step + 1) * batch))


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_ranks_slices_concatenate_to_the_same_global_batch(world):
    order = GroupOrder(_shards(1000, 7), seed=3, group=0, block_shards=3)
    for step in (0, 5, 17):
        whole = _global_batch(order, 1, step, 32)
        parts = []
        for rank in range(world):
            (positions,) = rank_slice(step, rank, world, 32, 1).positions
            parts += order.locate(1, positions)
        assert parts == whole


def test_an_epoch_is_a_permutation_and_epochs_differ():
    shards = _shards(300, 5)
    order = GroupOrder(shards, seed=0, group=0, block_shards=2)
    epoch0 = order.locate(0, range(300))
    assert sorted(epoch0) == sorted((s, i) for s, shard in enumerate(shards) for i in range(shard.num_samples))
    assert order.locate(1, range(300)) != epoch0
    assert order.locate(0, range(300, 600)) != epoch0  # the second pass is shuffled anew
    again = GroupOrder(shards, seed=0, group=0, block_shards=2)
    assert again.locate(0, range(300)) == epoch0
    other_seed = GroupOrder(shards, seed=1, group=0, block_shards=2)
    assert other_seed.locate(0, range(300)) != epoch0


def test_batches_mix_shards_within_a_block():
    order = GroupOrder(_shards(4000, 40), seed=0, group=0, block_shards=8)
    shards_in_batch = Counter(s for s, _ in _global_batch(order, 0, 3, 64))
    assert len(shards_in_batch) >= 6  # from up to 8 shards of its block, not one


def test_imagenet_size_plan_is_cheap_and_needs_no_data():
    """1,281,167 samples in 1,252 shards, 128 ranks x 8 workers, global batch 4096."""
    world, workers, batch = 128, 8, 4096
    tracemalloc.start()
    started = time.perf_counter()
    order = GroupOrder(_shards(IMAGENET_SAMPLES, IMAGENET_SHARDS), seed=0, group=0, block_shards=16)
    steps_per_epoch = IMAGENET_SAMPLES // batch
    step = 400_000
    epoch, in_epoch = divmod(step, steps_per_epoch)
    # Every rank's share of the resume step, for the worker that builds it.
    located = []
    for rank in range(world):
        (positions,) = rank_slice(in_epoch, rank, world, batch, 1).positions
        assert len(positions) == batch // world
        located += order.locate(epoch, positions)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 2.0, f"planning took {elapsed:.2f} s"
    assert peak < 200 * 2**20, f"planning peaked at {peak / 2**20:.0f} MB"
    assert len(set(located)) == batch  # the ranks' shares are disjoint and fill the global batch
    # Equal step counts: every rank and worker has the same steps (a function of the plan only).
    per_worker = [len(range(w, steps_per_epoch, workers)) for w in range(workers)]
    assert sum(per_worker) == steps_per_epoch and max(per_worker) - min(per_worker) <= 1
