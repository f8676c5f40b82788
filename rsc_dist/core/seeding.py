"""The one integer seed mixer of the project: every seeded draw (sample order, augmentation,
RSC's spatial/channel draw and random scores) derives its seed from a tuple of integers
through this function, never from Python's ``hash`` or from global RNG state."""

from __future__ import annotations

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = 2**64


def mix_seed(*numbers: int) -> int:
    """A fixed, platform-independent 63-bit mix of integers (order matters)."""
    value = _GOLDEN
    for number in numbers:
        value = (value ^ (int(number) + _GOLDEN + (value << 6) + (value >> 2))) % _MASK64
        value = (value * 0xBF58476D1CE4E5B9) % _MASK64
    return value % (2**63)
