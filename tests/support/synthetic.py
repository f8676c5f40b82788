"""Synthetic global batches for the step-level equivalence tests: the same on every rank."""

import torch


def synthetic_batch(step: int, global_batch: int, classes: int, size: int = 64):
    """(uint8 images (N, 3, size, size), labels (N,)) of global step ``step``, from a seeded generator."""
    g = torch.Generator().manual_seed(100 + step)
    images = torch.randint(0, 256, (global_batch, 3, size, size), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, classes, (global_batch,), generator=g)
