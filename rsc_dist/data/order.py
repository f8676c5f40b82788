"""The global sample order: which samples make up global batch i of an epoch, for any number
of ranks and loader workers (docs/architecture.md, "Sample order").

One sequence per sampling group (a source domain with balanced sampling, all sources pooled
with merged sampling), fixed by (seed, group, epoch) alone:

    pass p of epoch e  = every sample of the group once, in block-shuffled order:
                         the shards in a seeded random order, cut into blocks of
                         ``block_shards`` consecutive shards, the samples of each block in a
                         seeded random order
    epoch e            = pass 0, pass 1, ... (an epoch longer than the data cycles)
    global batch i     = positions [i * B, (i + 1) * B) of the sequence, B the global batch per
                         group; rank r of W takes positions [i*B + r*B/W, i*B + (r+1)*B/W)

Nothing here depends on the number of ranks or workers except which slice a rank takes, so
any W that divides B sees the same global batches, and a position is computed from the step
number alone: resuming at step 400,000 reads nothing that was skipped.

Cost: per (epoch, pass) one permutation of the shards (S ints); per block one permutation of its
samples (about block_shards x samples-per-shard ints), cached. Planning never touches data.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from rsc_dist.core.seeding import mix_seed


@dataclass(frozen=True)
class ShardRef:
    """One training shard as the manifest describes it."""

    path: str
    num_samples: int
    num_bytes: int
    sample_offsets: tuple[int, ...] | None = None  # n + 1 byte offsets (manifest v2), or None
    # The samples of the shard that take part, ascending (a holdout split, rsc_dist.data.holdout);
    # None: all of them.
    selected: tuple[int, ...] | None = None

    @property
    def size(self) -> int:
        """How many of its samples take part."""
        return self.num_samples if self.selected is None else len(self.selected)

    def sample_indices(self) -> np.ndarray:
        """The indices in the shard of the samples that take part, ascending."""
        if self.selected is None:
            return np.arange(self.num_samples)
        return np.asarray(self.selected, dtype=np.int64)


class GroupOrder:
    """The block-shuffled sequence of one sampling group's samples."""

    def __init__(self, shards: list[ShardRef], *, seed: int, group: int, block_shards: int,
                 cache_blocks: int = 4):
        if not shards or any(s.size < 1 for s in shards):
            raise ValueError("every training shard of a group must hold at least one sample")
        self.shards = list(shards)
        self.seed, self.group, self.block_shards = seed, group, max(1, block_shards)
        self.counts = np.array([s.size for s in shards], dtype=np.int64)
        self.num_samples = int(self.counts.sum())
        self._passes: OrderedDict = OrderedDict()
        self._blocks: OrderedDict = OrderedDict()
        self._cache_blocks = cache_blocks

    def _pass_layout(self, epoch: int, pass_index: int):
        """(shard permutation, start position of each block, end) for one pass, cached."""
        key = (epoch, pass_index)
        layout = self._passes.get(key)
        if layout is None:
            rng = np.random.Generator(np.random.PCG64(mix_seed(self.seed, self.group, epoch, pass_index)))
            permutation = rng.permutation(len(self.shards))
            sizes = self.counts[permutation]
            block_sizes = np.add.reduceat(sizes, np.arange(0, len(sizes), self.block_shards))
            starts = np.concatenate([[0], np.cumsum(block_sizes)[:-1]])
            layout = (permutation, starts.tolist())
            self._passes[key] = layout
            if len(self._passes) > 4:
                self._passes.popitem(last=False)
        return layout

    def _block(self, epoch: int, pass_index: int, block: int):
        """(shard index, sample index) arrays of one block, in the block's shuffled order."""
        key = (epoch, pass_index, block)
        found = self._blocks.get(key)
        if found is None:
            permutation, _ = self._pass_layout(epoch, pass_index)
            members = permutation[block * self.block_shards:(block + 1) * self.block_shards]
            shard_of = np.repeat(members, self.counts[members])
            index_of = np.concatenate([self.shards[m].sample_indices() for m in members])
            rng = np.random.Generator(np.random.PCG64(mix_seed(self.seed, self.group, epoch, pass_index,
                                                               block + 1)))
            shuffle = rng.permutation(len(shard_of))
            found = (shard_of[shuffle], index_of[shuffle])
            self._blocks[key] = found
            if len(self._blocks) > self._cache_blocks:
                self._blocks.popitem(last=False)
        return found

    def locate(self, epoch: int, positions: range) -> list[tuple[int, int]]:
        """(shard index, sample index in the shard) of each position of the epoch's sequence."""
        located = []
        for position in positions:
            pass_index, within = divmod(position, self.num_samples)
            _, starts = self._pass_layout(epoch, pass_index)
            block = bisect.bisect_right(starts, within) - 1
            shard_of, index_of = self._block(epoch, pass_index, block)
            at = within - starts[block]
            located.append((int(shard_of[at]), int(index_of[at])))
        return located


@dataclass(frozen=True)
class BatchSlice:
    """Which positions of each group's sequence one rank trains on at one step."""

    step: int
    positions: tuple[range, ...]  # one range per group, in group order


def rank_slice(step: int, rank: int, world_size: int, global_batch_per_group: int, num_groups: int) -> BatchSlice:
    """Rank ``rank``'s share of global batch ``step`` (within an epoch): its contiguous slice of
    each group's part of the global batch."""
    local = global_batch_per_group // world_size
    start = step * global_batch_per_group + rank * local
    return BatchSlice(step, tuple(range(start, start + local) for _ in range(num_groups)))
