"""RSC's masks as pictures: the inputs with the muted regions tinted, and the caption that
names each column's class and whether RSC selected it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_overlay_grid(images: torch.Tensor, mask: torch.Tensor, count: int = 8) -> torch.Tensor:
    """uint8 (3, H', W') grid: inputs with muted regions darkened and tinted red.

    A spatial mask shows where features were muted; a channel mask mutes everywhere, so its
    overlay strength is the fraction of channels muted.
    """
    from torchvision.utils import make_grid

    n = min(count, images.shape[0])
    images = images[:n].float().cpu()
    keep = mask[:n].float().mean(dim=1, keepdim=True).cpu()  # (n, 1, h, w) or (n, 1, 1, 1)
    keep = F.interpolate(keep, size=images.shape[-2:], mode="nearest")
    red = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
    shaded = images * (0.4 + 0.6 * keep) + red * 0.4 * (1 - keep)
    return make_grid(shaded.clamp(0, 255).to(torch.uint8), nrow=n, padding=2)


def mask_caption(step: int, mode: str, labels=None, class_names=(), selected=None) -> str:
    """First line: step and mask mode; then one line per grid column (left to right):
    the sample's class and whether RSC selected it (its mask mutes something)."""
    lines = [f"step {step}, {mode} mask (red = muted); columns left to right:"]
    n = len(selected) if selected is not None else (len(labels) if labels is not None else 0)
    for i in range(n):
        name = "?"
        if labels is not None:
            label = int(labels[i])
            name = class_names[label] if 0 <= label < len(class_names) else f"class {label}"
        picked = "" if selected is None else (" selected" if selected[i] else " not selected")
        lines.append(f"{i + 1}: {name}{picked}")
    return "\n".join(lines)
