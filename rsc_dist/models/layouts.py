"""Where a backbone's features z keep their channels and their locations.

RSC (rsc_dist.methods.rsc_masks) scores and mutes whole channels or whole locations of z, so it
must know which axis is which. Three layouts occur:

- ``nchw``: a CNN's feature map (N, C, H, W): torchvision's backbones and most timm CNNs.
- ``nhwc``: a feature map with the channels last (N, H, W, C): the timm models whose
  ``forward_features`` returns that (Swin, MambaOut; their ``output_fmt`` says so).
- ``tokens``: a transformer's sequence (N, T, D): the first ``prefix_tokens`` tokens (class,
  register, distillation tokens) are not locations; the other T - P are the patch grid.

Every layout is read through the same two views: ``positions(z)`` (N, P, C), every position
(prefix tokens included) by channel, and ``locations(z)`` (N, L, C), the locations only. A
mask is built as a keep-vector per channel (N, C) or per location, and put back in z's layout
by ``channel_mask`` / ``location_mask``; ``picture`` turns it into the (N, c, h, w) form the
mask image grids draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("nchw", "nhwc", "tokens")


@dataclass(frozen=True)
class FeatureLayout:
    kind: str = "nchw"
    prefix_tokens: int = 0  # tokens: how many leading tokens are not locations
    grid: tuple[int, int] | None = None  # tokens: the patch grid (rows, columns), for pictures

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown feature layout {self.kind!r}; expected one of {KINDS}")

    def describe(self) -> str:
        if self.kind == "tokens":
            grid = f", {self.grid[0]} x {self.grid[1]} patch grid" if self.grid else ""
            return f"tokens (N, T, D), {self.prefix_tokens} prefix token(s){grid}"
        return {"nchw": "feature map (N, C, H, W)", "nhwc": "feature map (N, H, W, C)"}[self.kind]

    def check(self, z: Tensor) -> None:
        """A ValueError naming the expected shape when ``z`` does not have this layout."""
        if self.kind == "tokens":
            if z.dim() != 3 or z.shape[1] <= self.prefix_tokens:
                raise ValueError(f"features must be tokens (N, T, D) with T > {self.prefix_tokens} prefix "
                                 f"token(s); got shape {tuple(z.shape)}")
        elif z.dim() != 4:
            expected = "(N, C, H, W)" if self.kind == "nchw" else "(N, H, W, C)"
            raise ValueError(f"features must be {expected}; got shape {tuple(z.shape)}")

    def channels(self, z: Tensor) -> int:
        return z.shape[1] if self.kind == "nchw" else z.shape[-1]

    def location_shape(self, z: Tensor) -> tuple[int, ...]:
        """The shape of one sample's location scores: (H, W) for maps, (L,) for tokens."""
        if self.kind == "tokens":
            return (z.shape[1] - self.prefix_tokens,)
        return tuple(z.shape[2:]) if self.kind == "nchw" else tuple(z.shape[1:3])

    def positions(self, z: Tensor) -> Tensor:
        """(N, P, C): every position of z (prefix tokens included) by channel."""
        if self.kind == "nchw":
            return z.flatten(2).transpose(1, 2)
        if self.kind == "nhwc":
            return z.flatten(1, 2)
        return z

    def locations(self, z: Tensor) -> Tensor:
        """(N, L, C): the locations of z (patch tokens; every position of a map)."""
        positions = self.positions(z)
        return positions[:, self.prefix_tokens:] if self.kind == "tokens" else positions

    def channel_mask(self, keep: Tensor) -> Tensor:
        """A per-channel (N, C) keep-vector, broadcastable to z."""
        if self.kind == "nchw":
            return keep[:, :, None, None]
        if self.kind == "nhwc":
            return keep[:, None, None, :]
        return keep[:, None, :]

    def location_mask(self, keep: Tensor, prefix_value: float = 1.0) -> Tensor:
        """A per-location keep-mask (N, *location_shape), broadcastable to z; prefix tokens
        take ``prefix_value`` (1: never muted)."""
        if self.kind == "nchw":
            return keep[:, None]
        if self.kind == "nhwc":
            return keep[..., None]
        prefix = torch.full((keep.shape[0], self.prefix_tokens), prefix_value, dtype=keep.dtype, device=keep.device)
        return torch.cat([prefix, keep], dim=1)[..., None]

    def picture(self, mask: Tensor, mode: str) -> Tensor:
        """The mask as (N, c, h, w), what the mask image grids draw: a location mask as (N, 1, h, w)
        over the patch grid (prefix tokens left out), a channel mask as (N, C, 1, 1)."""
        if self.kind == "nchw":
            return mask
        if self.kind == "nhwc":
            return mask.permute(0, 3, 1, 2)
        if mode == "channel":
            return mask.transpose(1, 2)[..., None]
        locations = mask[:, self.prefix_tokens:, 0]
        rows, columns = self.grid if self.grid and self.grid[0] * self.grid[1] == locations.shape[1] \
            else (1, locations.shape[1])
        return locations.reshape(locations.shape[0], 1, rows, columns)


NCHW = FeatureLayout("nchw")


def layout_of(head) -> FeatureLayout:
    """The layout of the features ``head`` reads (torchvision's heads read NCHW maps)."""
    return getattr(head, "layout", NCHW)
