"""The one integer seed mixer of the project: every seeded draw (sample order, augmentation,
RSC's spatial/channel draw and random scores, a method's per-sample draws) derives its seed from
a tuple of integers through ``mix_seed``, never from Python's ``hash`` or from global RNG
state; ``hashed_uniform`` turns per-sample seeds into numbers on the device."""

from __future__ import annotations

import torch
from torch import Tensor

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = 2**64


def mix_seed(*numbers: int) -> int:
    """A fixed, platform-independent 63-bit mix of integers (order matters)."""
    value = _GOLDEN
    for number in numbers:
        value = (value ^ (int(number) + _GOLDEN + (value << 6) + (value >> 2))) % _MASK64
        value = (value * 0xBF58476D1CE4E5B9) % _MASK64
    return value % (2**63)


def _as_int64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


_SPLITMIX = tuple(_as_int64(v) for v in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical shift of int64 values (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix(x: Tensor) -> Tensor:
    """SplitMix64's finalizer on int64 tensors (products wrap modulo 2**64), on any device."""
    x = x + _SPLITMIX[0]
    x = (x ^ _shift_right(x, 30)) * _SPLITMIX[1]
    x = (x ^ _shift_right(x, 27)) * _SPLITMIX[2]
    return x ^ _shift_right(x, 31)


def hashed_uniform(seeds: Tensor, count: int, *, salt: int = 0) -> Tensor:
    """(N, count) float32 in [0, 1): value j of row i is a hash of (seeds[i], salt, j).

    Counter-based, on the seeds' device, no generator state and no host sync: the same seed
    gives the same row in any batch, on any rank.
    """
    counters = _splitmix(torch.arange(count, device=seeds.device, dtype=torch.int64) + (salt << 32))
    bits = _splitmix(_splitmix(seeds)[:, None] ^ counters[None, :])
    return (_shift_right(bits, 40).to(torch.float32) / float(1 << 24))
