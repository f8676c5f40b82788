"""Training augmentation that runs either in a loader worker or batched on the training device.

The random choices of one sample are drawn once, cheaply, into a parameter vector
(:func:`draw_params`, seeded per sample, no global RNG). The pixels are then computed by ONE
implementation, used by both paths:

- worker path: :func:`augment_one` (one decoded ``uint8 (3, H, W)`` CPU image);
- device path: :func:`decode_batch` (every JPEG of the batch in one TorchCodec call, on the
  device) then :func:`augment_batch` (crop+resize+flip of the whole batch as two batched
  matrix products, colour jitter with per-sample factors and per-sample op order, grayscale),
  in a number of tensor ops that does not grow with the batch.

``augment_one`` is ``augment_batch`` with a batch of one, so the two paths cannot drift. On a
CPU device the crop+resize runs per image through ATen's kernel (faster there); the batched
products give the same pixels (tested), and accelerators use them.

Semantics are those of the torchvision v2 pipeline ``Augment.train_transform()`` (kept below
as the reference): with ``torch.manual_seed(seed)``, that pipeline draws exactly the numbers
``draw_params(..., seed)`` draws, in the same order, and ``augment_one`` gives the same uint8
pixels (tests/test_augment.py checks this). The colour ops reproduce
``torchvision.transforms.v2.functional`` on uint8 images:

- crop + resize (+ flip): ATen's uint8 antialiased bilinear kernel, its int16 weights computed
  the same way and applied by exact products (section "Crop + resize of a whole batch");
- brightness: ``x * f`` in float32, clamped, truncated to uint8;
- contrast / saturation: torchvision blends with ``x.mul(f).add_(other, alpha=1 - f)``, which
  PyTorch evaluates as a fused multiply-add (one rounding) on CPUs with FMA and on CUDA. With
  a different ``f`` per sample there is no tensor-alpha ``add``, so the fused step is computed
  in float64 (the products are exact there) and rounded once to float32;
- contrast's mean is the float32 mean of the floored grayscale image; the sum is taken
  exactly (integers), then divided in float32, as torch.mean does on CPU (exact while
  ``image_size <= 256``, where torchvision's own float32 sum is exact too);
- hue: RGB -> HSV -> RGB in float32 with the same operation sequence as torchvision;
- grayscale: ITU-R 601-2 luma (0.2989, 0.587, 0.114), truncated to uint8, 3 channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torchvision.transforms import v2

# --------------------------------------------------------------------------------------------
# Configuration and parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    image_size: int
    crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: bool = True
    color_jitter: float = 0.4
    grayscale: float = 0.1

    def train_transform(self) -> v2.Compose:
        """The torchvision pipeline these parameters and ops reproduce (reference, worker-only)."""
        steps = [v2.RandomResizedCrop(self.image_size, scale=self.crop_scale, antialias=True)]
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if self.color_jitter > 0:
            j = self.color_jitter
            steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j)))
        if self.grayscale > 0:
            steps.append(v2.RandomGrayscale(self.grayscale))
        return v2.Compose(steps)

    def eval_transform(self) -> v2.Resize:
        return v2.Resize((self.image_size, self.image_size), antialias=True)


# One row of the (N, P) parameter tensor. float64 holds every value exactly (ints < 2**53;
# jitter factors are float32 draws).
PARAM_FIELDS: tuple[str, ...] = (
    "size",  # output side S (augment.image_size; not random, carried so the ops need no config)
    "top", "left", "height", "width",  # crop box in the decoded image
    "flip",  # 1: horizontal flip
    "jitter",  # 1: colour jitter applied (0 when color_jitter == 0: all four ops skipped)
    "brightness", "contrast", "saturation", "hue",  # factors (identity 1, 1, 1, 0 when off)
    "order0", "order1", "order2", "order3",  # op ids (0 b, 1 c, 2 s, 3 h) in application order
    "grayscale",  # 1: convert to 3-channel grayscale (last step)
)
NUM_PARAMS = len(PARAM_FIELDS)
_I = {name: index for index, name in enumerate(PARAM_FIELDS)}
SIZE = _I["size"]
TOP, LEFT, HEIGHT, WIDTH = _I["top"], _I["left"], _I["height"], _I["width"]
FLIP, JITTER, GRAY = _I["flip"], _I["jitter"], _I["grayscale"]
FACTORS = slice(_I["brightness"], _I["hue"] + 1)
ORDER = slice(_I["order0"], _I["order3"] + 1)

_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    # float32 draw, as torchvision's `torch.empty(1).uniform_(low, high).item()`.
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def _crop_box(height: int, width: int, scale: tuple[float, float], g: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params: 10 tries of (scale, log-uniform ratio), then central crop."""
    area = height * width
    log_ratio = torch.log(torch.tensor(_RATIO))  # float32, as torchvision
    for _ in range(10):
        target_area = area * _uniform(g, scale[0], scale[1])
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
            return top, left, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(_RATIO):
        w, h = width, int(round(width / min(_RATIO)))
    elif in_ratio > max(_RATIO):
        h, w = height, int(round(height * max(_RATIO)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_params(augment: Augment, height: int, width: int, seed: int) -> torch.Tensor:
    """Every random choice for one sample of a ``height`` x ``width`` image: float64 (NUM_PARAMS,).

    Draws come only from ``torch.Generator().manual_seed(seed)``, in the order (and with the
    distributions) of ``augment.train_transform()``; disabled steps draw nothing.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} is empty")
    g = torch.Generator().manual_seed(int(seed))
    params = torch.zeros(NUM_PARAMS, dtype=torch.float64)
    params[SIZE] = augment.image_size
    params[TOP:WIDTH + 1] = torch.tensor(_crop_box(height, width, tuple(augment.crop_scale), g), dtype=torch.float64)
    if augment.hflip:
        params[FLIP] = float(torch.rand(1, generator=g).item() < 0.5)
    params[FACTORS] = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    params[ORDER] = torch.arange(4, dtype=torch.float64)
    j = float(augment.color_jitter)
    if j > 0:
        params[JITTER] = 1.0
        params[ORDER] = torch.randperm(4, generator=g).to(torch.float64)
        hue = min(0.5, j)
        params[FACTORS] = torch.tensor(
            [_uniform(g, max(0.0, 1.0 - j), 1.0 + j) for _ in range(3)] + [_uniform(g, -hue, hue)],
            dtype=torch.float64,
        )
    if augment.grayscale > 0:
        params[GRAY] = float(torch.rand(1, generator=g).item() < augment.grayscale)
    return params


# --------------------------------------------------------------------------------------------
# Per-sample-factor ops on uint8 (N, 3, H, W); factors are (N,) tensors. Shared by both paths.
# Pass factors as float64 (draw_params does): they stand for the Python floats torchvision
# gets, and contrast/saturation use 1 - factor computed in float64, then rounded to float32.
# --------------------------------------------------------------------------------------------


def _float32(factors: torch.Tensor, device: torch.device) -> tuple[torch.Tensor]:
    return (torch.as_tensor(factors).to(device=device, dtype=torch.float32),)


def _blend_factors(factors: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fl32(ratio), fl32(1 - ratio) held in float64) from float64 ratios."""
    ratio = torch.as_tensor(factors).to(device=device, dtype=torch.float64)
    return ratio.to(torch.float32), (1.0 - ratio).to(torch.float32).to(torch.float64)


def _per_sample(factors: torch.Tensor, dims: int = 4) -> torch.Tensor:
    return factors.view((-1,) + (1,) * (dims - 1))


def _luma(images: torch.Tensor) -> torch.Tensor:
    """float32 (N, 1, H, W) grayscale, the same float ops (and FMA roundings) as torchvision."""
    r, g, b = images.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(dim=-3)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """uint8 of clamp(fl32(fma(other, fl32(1 - ratio), fl32(images * fl32(ratio))))).

    torchvision's ``images.mul(r).add_(other, alpha=1 - r)`` is one FMA per element (CPU with
    FMA, CUDA). Here ``alpha`` differs per sample, so the FMA is done in float64: the product
    is exact there (uint8 x float32, or float32 x float32 <= 48 bits) and the sum is rounded
    once to float64, then to float32. That double rounding can differ from one FMA rounding
    only when the float64 sum lands exactly on a float32 rounding midpoint (about 2**-29 per
    value, and then only matters if it also moves the value across an integer).
    ``ratio`` and ``alpha`` come from _blend_factors.
    """
    fused = images.mul(_per_sample(ratio)).add(other.mul(_per_sample(alpha)))  # float64 sum
    return fused.to(torch.float32).clamp_(0, 255).to(torch.uint8)


def _brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return images.mul(_per_sample(factors)).clamp_(0, 255).to(torch.uint8)


def _contrast(images: torch.Tensor, ratio: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    gray = _luma(images).floor_()
    count = gray.shape[-1] * gray.shape[-2]
    # Integer-valued: the float64 sum is exact; float32 division as torch.mean on CPU.
    total = gray.sum(dim=(-3, -2, -1), keepdim=True, dtype=torch.float64).to(torch.float32)
    return _blend(images, total.div_(count), ratio, alpha)


def _saturation(images: torch.Tensor, ratio: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return _blend(images, _luma(images).floor_(), ratio, alpha)


_HSV_SELECT = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])  # (v,p,q,t) per sector


def _hue(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    x = images.to(torch.float32).mul_(1.0 / 255.0)
    r, g, _ = x.unbind(dim=-3)
    minc, maxc = torch.aminmax(x, dim=-3)
    flat = maxc == minc
    span = maxc - minc
    sat = span / maxc.masked_fill(flat, 1.0)
    rc, gc, bc = ((maxc.unsqueeze(-3) - x) / span.masked_fill(flat, 1.0).unsqueeze(-3)).unbind(dim=-3)
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, (rc + 2.0) - bc, (gc + 4.0) - rc))
    hue = hue.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    hue = hue.add_(_per_sample(factors, dims=3)).remainder_(1.0)
    # HSV -> RGB
    h6 = hue.mul_(6.0)
    sector = torch.floor(h6)
    frac = h6.sub_(sector)
    sector = sector.to(torch.int64).remainder_(6)
    sxf = sat * frac
    one_minus_s = 1.0 - sat
    q = (1.0 - sxf).mul_(maxc).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(maxc).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(maxc).clamp_(0.0, 1.0)
    vpqt = torch.stack((maxc, p, q, t), dim=-3)
    select = _HSV_SELECT.to(images.device)[sector].movedim(-1, -3)
    return vpqt.gather(-3, select).mul_(255.0 + 1.0 - 1e-3).to(torch.uint8)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """3-channel grayscale, as rgb_to_grayscale(x, num_output_channels=3)."""
    return _luma(images).to(torch.uint8).expand(images.shape).contiguous()


# Per op id (0 b, 1 c, 2 s, 3 h): the kernel, on images and per-sample factor forms; and what
# makes those forms from float64 factors (once per batch, not once per subset).
_KERNELS = (_brightness, _contrast, _saturation, _hue)
_FACTOR_FORMS = (_float32, _blend_factors, _blend_factors, _float32)


# The ops of torchvision.transforms.v2.functional, with one (float64) factor per sample.
def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return _brightness(images, *_float32(factors, images.device))


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return _contrast(images, *_blend_factors(factors, images.device))


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return _saturation(images, *_blend_factors(factors, images.device))


def adjust_hue(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return _hue(images, *_float32(factors, images.device))


COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # indexed by op id


# --------------------------------------------------------------------------------------------
# Crop + resize of a whole batch: batched matrix products
# --------------------------------------------------------------------------------------------
#
# torchvision resizes a uint8 CPU image (``resized_crop`` / ``resize``, bilinear, antialias) with
# ATen's Pillow-SIMD kernel: per axis, a triangle filter whose support is the scale factor when
# downscaling (1 when upscaling), centres at ``scale * (i + 0.5)`` (align_corners=False),
# weights normalized to sum 1 and rounded to int16 at a precision ``p`` chosen from the largest
# weight; each output is ``(2**(p-1) + sum(pixel * weight)) >> p`` clamped to uint8, the
# horizontal pass first (to a uint8 buffer), then the vertical one.
#
# Here the weights of every sample and both axes are computed at once, with ATen's float64
# operation sequence, on the images' device, and each pass is ONE batched matrix product. The
# outputs of an axis are cut into tiles of _TILE; a tile reads a short window of input lines
# (about _TILE x scale), so the product runs over (sample, tile) pairs with small dense
# matrices rather than one mostly-zero matrix per sample. The crop's offset and the flip are
# folded into where each weight sits. The products are in float64 and exact: pixels are 8-bit
# integers, weights 15-bit integers, every partial sum an integer below 2**31. Exact means
# independent of summation order, padding and batch: on the CPU, the same uint8 pixels as
# torchvision for one image or in any batch. On CUDA the normalizing sum of the weights is a
# parallel scan rather than ATen's sequential loop: an int16 weight may come out one unit
# apart there, a level at most in a pixel, rarely.

_TILE = 16  # outputs per tile


def _window(longest: int, out_size: int) -> tuple[int, int]:
    """(taps, window) for inputs up to ``longest``: the most taps of one output, and the most
    input lines a tile of _TILE outputs reads: its first output's first tap is >= centre -
    support - 0.5, its last output's last tap <= centre + support - 0.5, centres (_TILE - 1) x
    scale apart."""
    scale = longest / out_size
    support = max(scale, 1.0)
    return 2 * math.ceil(support) + 1, math.floor((_TILE - 1) * scale + 2 * support) + 2


def _tile_matrices(lengths: torch.Tensor, offsets: torch.Tensor, reverse: torch.Tensor, out_size: int,
                   taps: int, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ATen's antialiased bilinear int16 weights for M axes at once, as per-tile matrices.

    Axis m reads ``lengths[m]`` input lines from line ``offsets[m]``; output j is written to
    position S - 1 - j where ``reverse[m]``. Positions are padded to T = ceil(S / _TILE) tiles
    (the padding positions get no weight). Returns, on ``lengths``' device: ``start`` (M, T),
    the first input line of each tile's window; ``matrix`` float64 (M, T, _TILE, window), the
    integer weights by output position and window line; and (M, 1) float64 ``bias`` = 2**(p-1)
    and ``unit`` = 2**-p for each axis' precision p. The float64 operations are those of ATen's
    ``_compute_indices_int16_weights_aa`` (UpSampleKernel.cpp).
    """
    device, count = lengths.device, len(lengths)
    tiles = -(-out_size // _TILE)
    # float64 output positions; the padding positions repeat the last one
    position = torch.arange(tiles * _TILE, dtype=torch.float64, device=device).clamp_(max=out_size - 1)
    output = torch.where(reverse.unsqueeze(1), (out_size - 1) - position, position)  # (M, T*TILE)
    length = lengths.unsqueeze(1)  # float64
    scale = length / out_size
    support = scale.clamp(min=1.0)  # the triangle's half-width: the scale when downscaling
    center = scale * (output + 0.5)
    first = (center - support + 0.5).to(torch.int64).clamp_(min=0)  # C++ casts truncate, as .to()
    count_taps = (center + support + 0.5).clamp_(max=length).to(torch.int64) - first
    k = torch.arange(taps, device=device)
    distance = ((first.unsqueeze(-1) + k).to(torch.float64) - center.unsqueeze(-1) + 0.5) * support.reciprocal().unsqueeze(-1)
    weights = (1.0 - distance.abs()).clamp_(min=0.0).masked_fill_(k >= count_taps.unsqueeze(-1), 0.0)
    weights = weights.div_(weights.cumsum(-1)[..., -1:])  # the total > 0; sequential on the CPU, as ATen
    # Precision: the first p < 22 where round(w_max * 2**(p + 1)) reaches 2**15, else 22.
    powers = torch.exp2(torch.arange(1, 23, dtype=torch.float64, device=device))
    precision = (weights.amax((1, 2)).unsqueeze(1).mul(powers).add_(0.5) < float(1 << 15)).sum(1, keepdim=True)
    power = torch.exp2(precision.to(torch.float64))  # (M, 1)
    weights = weights.mul_(power.unsqueeze(-1)).add_(0.5).trunc_()
    if tiles * _TILE > out_size:
        weights[:, out_size:] = 0.0
    first = (first + offsets.unsqueeze(1)).view(count, tiles, _TILE)  # lines of the shared window
    start = first.amin(-1)
    local = (first - start.unsqueeze(-1)).unsqueeze(-1) + k
    local = local.clamp_(max=window - 1)  # only taps of weight 0 lie past the window
    matrix = torch.zeros(count, tiles, _TILE, window, dtype=torch.float64, device=device)
    matrix = matrix.scatter_add_(3, local, weights.view(count, tiles, _TILE, taps))
    return start, matrix, power * 0.5, power.reciprocal()


def _round_pass(sums: torch.Tensor, bias: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """uint8 of ``(2**(p-1) + sums) >> p``, clamped, as ATen; ``sums`` float64 integers below
    2**31 of shape (N, ...), ``bias``/``unit`` (N, 1); exact (powers of two)."""
    return sums.add_(bias).mul_(unit).clamp_(0, 255).to(torch.uint8)  # truncation is the floor here (>= 0)


def _pad_batch(images: Sequence[torch.Tensor], heights: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, Hmax, Wmax), image n in the top-left corner, zeros elsewhere; a constant
    number of ops for any N: one flat concatenation of every image, scattered into place
    (images of one size, as a worker's single image, are simply stacked). ``heights`` and
    ``widths`` are the images' sizes, (N,) on their device."""
    if len({tuple(image.shape) for image in images}) == 1:
        return torch.stack(list(images))
    height, width = max(image.shape[-2] for image in images), max(image.shape[-1] for image in images)
    device = images[0].device
    flat = torch._chunk_cat(list(images), 0, 1)[0]  # each image flattened in (C, H, W) order
    inside = ((torch.arange(height, device=device).view(1, 1, height, 1) < heights.view(-1, 1, 1, 1))
              & (torch.arange(width, device=device).view(1, 1, 1, width) < widths.view(-1, 1, 1, 1)))
    padded = torch.zeros(len(images), 3, height, width, dtype=torch.uint8, device=device)
    return padded.masked_scatter_(inside, flat)


def _crop_resize_batch(images: Sequence[torch.Tensor], boxes: Sequence[Sequence[int]], size: int,
                       flips: Sequence[bool]) -> torch.Tensor:
    """uint8 (N, 3, S, S): each image's box (top, left, height, width) resized
    to S x S as torchvision's resized_crop (bilinear, antialias), flipped where ``flips``.

    A constant number of ops for any N and any sizes: the padded batch is cut to the window
    spanning every box, then one batched matrix product per axis.
    """
    count, device = len(images), images[0].device
    row0, col0 = min(box[0] for box in boxes), min(box[1] for box in boxes)
    rows = max(box[0] + box[2] for box in boxes) - row0
    cols = max(box[1] + box[3] for box in boxes) - col0
    # One transfer: axes 0..N-1 are the widths (flipped where asked), N..2N-1 the heights.
    lengths = [box[3] for box in boxes] + [box[2] for box in boxes]
    table = torch.tensor([lengths, [box[1] - col0 for box in boxes] + [box[0] - row0 for box in boxes],
                          [bool(flip) for flip in flips] + [False] * count,
                          [image.shape[-2] for image in images] * 2, [image.shape[-1] for image in images] * 2],
                         dtype=torch.float64)
    lengths_d, offsets, reverse, heights, widths = _to(table, device).unbind(0)
    padded = _pad_batch(images, heights[:count], widths[:count])
    source = padded[:, :, row0:row0 + rows, col0:col0 + cols]
    taps, window = _window(max(lengths), size)
    start, matrix, bias, unit = _tile_matrices(lengths_d, offsets.to(torch.int64), reverse != 0, size, taps, window)
    tiles = start.shape[1]
    matrix = matrix.view(2 * count * tiles, _TILE, window)
    # Each tile's input lines (columns, then rows) are whole contiguous lines of a transposed
    # copy, taken with one index_select per pass.
    reach = torch.arange(window, device=device)
    base = torch.arange(count, device=device).view(-1, 1, 1)

    def lines(batch: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """float64 (N*T, window, L): the lines ``starts[n, t] + w`` of ``batch`` (N, lines, L)."""
        length = batch.shape[1]
        index = (starts.unsqueeze(-1) + reach).clamp_(max=length - 1).add_(base * length)
        picked = batch.reshape(count * length, -1).index_select(0, index.view(-1))
        return picked.to(torch.float64).view(count * tiles, window, -1)

    # Horizontal pass over the columns: (N*T, TILE, window) @ (N*T, window, 3*rows).
    sums = torch.bmm(matrix[:count * tiles], lines(source.permute(0, 3, 1, 2), start[:count]))
    across = _round_pass(sums.view(count, -1), bias[:count], unit[:count])  # (N, T*TILE columns, 3, rows)
    # Vertical pass over the rows of the (N, rows, T*TILE * 3) transposed result.
    across = across.view(count, tiles * _TILE * 3, rows).transpose(1, 2)
    sums = torch.bmm(matrix[count * tiles:], lines(across, start[count:]))  # (N*T, TILE, T*TILE * 3)
    down = _round_pass(sums.view(count, -1), bias[count:], unit[count:])
    out = down.view(count, tiles * _TILE, tiles * _TILE, 3)[:, :size, :size]  # (N, S, S, 3)
    # The standard layout on both paths: a model computes in float, and another memory layout
    # can change its roundings (the device path trains to the same weights: tests/test_train.py).
    return out.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# The two paths
# --------------------------------------------------------------------------------------------


# On a CPU, crop+resize runs per image through ATen's own uint8 kernel: the same pixels as the
# batched matrix products (tests/test_augment.py checks they are equal), about 2x faster per
# image on a CPU, where a constant op count buys nothing (the worker path, the eval collate).
# Accelerators take the batched products: a constant number of ops per batch.
_CPU_PER_IMAGE_RESIZE = True

# On CPU, ops run on chunks of about this many elements (1 image at 224 px, 10 at 64 px):
# the float intermediates of a whole (64, 3, 224, 224) batch (tens of MB each) would leave the
# caches and be re-allocated from the OS on every op. Accelerators take the whole subset.
_CPU_CHUNK_ELEMENTS = 1 << 17


def _apply(out: torch.Tensor, rows: list[int], index: torch.Tensor, op, factors: tuple[torch.Tensor, ...]) -> None:
    """out[rows] = op(out[rows], *(f[rows] for f in factors)), in place. ``index`` holds ``rows``
    on ``out``'s device; ``factors`` are (N,) tensors there."""
    if not rows:
        return
    step = len(rows)
    if out.device.type == "cpu":
        step = max(1, _CPU_CHUNK_ELEMENTS // out[0].numel())
    for start in range(0, len(rows), step):
        part = rows[start:start + step]
        first, count = part[0], len(part)
        if part[-1] - first + 1 == count:  # consecutive rows: a view, no gather/scatter
            view = out.narrow(0, first, count)
            view.copy_(op(view, *(factor.narrow(0, first, count) for factor in factors)))
            continue
        where = index if count == len(rows) else index.narrow(0, start, count)
        args = (factor.index_select(0, where) for factor in factors)
        out.index_copy_(0, where, op(out.index_select(0, where), *args))


def _crop_resize_each(images: Sequence[torch.Tensor], boxes: Sequence[Sequence[int]], size: int,
                      flips: Sequence[bool]) -> torch.Tensor:
    """What :func:`_crop_resize_batch` computes, one image at a time with torchvision's kernel."""
    out = []
    for image, (top, left, height, width), flip in zip(images, boxes, flips):
        resized = v2.functional.resized_crop(image, top, left, height, width, [size, size],
                                             interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        out.append(resized.flip(-1) if flip else resized)
    return torch.stack(out)


def _crop_resize(images: Sequence[torch.Tensor], boxes: Sequence[Sequence[int]], size: int,
                 flips: Sequence[bool]) -> torch.Tensor:
    if images[0].device.type == "cpu" and _CPU_PER_IMAGE_RESIZE:
        return _crop_resize_each(images, boxes, size, flips)
    return _crop_resize_batch(images, boxes, size, flips)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device`` without making the host wait: a copy from pageable
    memory to a GPU is synchronous, one from pinned memory is not."""
    if device.type == "cpu":
        return tensor
    return tensor.contiguous().pin_memory().to(device, non_blocking=True)


def _check_params(params: torch.Tensor, count: int) -> tuple[torch.Tensor, list[list[float]], int]:
    params = torch.as_tensor(params).to("cpu", torch.float64)
    if params.ndim == 1:
        params = params.unsqueeze(0)
    if params.shape != (count, NUM_PARAMS):
        raise ValueError(f"params shape {tuple(params.shape)} != ({count}, {NUM_PARAMS})")
    rows = params.tolist()
    sizes = {int(row[SIZE]) for row in rows}
    if len(sizes) != 1:
        raise ValueError(f"one output size per batch, got {sorted(sizes)}")
    return params, rows, sizes.pop()


def augment_batch(images: Sequence[torch.Tensor], params: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) on the images' device from N uint8 (3, Hi, Wi) images.

    ``params`` is (N, NUM_PARAMS) (rows of draw_params for each image's own size; any device).
    Crop+resize (with the flip) runs on the whole batch at once, then colour jitter
    (per-sample factors, applied in 4 rounds: round k applies each op to the samples whose
    order puts it at position k) and grayscale on index subsets of it: a number of ops that
    does not grow with N (on CPU, subsets run in cache-sized chunks).
    """
    if len(images) == 0:
        raise ValueError("empty batch")
    params, rows, size = _check_params(params, len(images))
    device = images[0].device
    for image in images:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3 or image.device != device:
            raise ValueError(f"expected uint8 (3, H, W) images on {device}, got {image.dtype} "
                             f"{tuple(image.shape)} on {image.device}")
    out = _crop_resize(images, [[int(v) for v in row[TOP:WIDTH + 1]] for row in rows], size,
                             [bool(row[FLIP]) for row in rows])
    # The samples of each (round, op) and the grayscale ones, as runs of one index tensor; it
    # and the factors go to the device in one transfer (the factors as their float64 bits).
    jitter = [n for n, row in enumerate(rows) if row[JITTER]]
    groups = [[n for n in jitter if int(rows[n][ORDER.start + position]) == op_id]
              for position in range(4) for op_id in range(len(COLOR_OPS))]
    groups.append([n for n, row in enumerate(rows) if row[GRAY]])
    order = [n for group in groups for n in group]
    factors = params[:, FACTORS].t().contiguous().view(torch.int64)  # (4, N)
    moved = _to(torch.cat([factors.view(-1), torch.tensor(order, dtype=torch.int64)]), device)
    factors, index = moved.split([factors.numel(), len(order)])
    factors = factors.view(torch.float64).view(len(COLOR_OPS), -1).unbind(0)
    forms = [make(factor, device) for make, factor in zip(_FACTOR_FORMS, factors)]
    kernels = [*zip(_KERNELS, forms)] * 4 + [(to_grayscale, ())]
    for group, where, (kernel, factor_forms) in zip(groups, index.split([len(group) for group in groups]), kernels):
        _apply(out, group, where, kernel, factor_forms)
    return out


def augment_one(image: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The worker path: uint8 (3, S, S) from one uint8 (3, H, W) image (augment_batch, N=1)."""
    return augment_batch([image], torch.as_tensor(params).reshape(1, -1))[0]


def eval_resize(images: torch.Tensor | Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Resize((S, S)) bilinear antialias: (3, H, W) -> (3, S, S), or a list -> (N, 3, S, S)."""
    single = isinstance(images, torch.Tensor) and images.ndim == 3
    images = [images] if single else list(images)
    if not images:
        raise ValueError("empty batch")
    boxes = [(0, 0, image.shape[-2], image.shape[-1]) for image in images]
    out = _crop_resize(images, boxes, size, [False] * len(images))
    return out[0] if single else out


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

_JPEG_SOI = b"\xff\xd8\xff"


def is_jpeg(data: bytes | bytearray | memoryview | torch.Tensor) -> bool:
    """True if ``data`` (encoded bytes, or a 1-D uint8 tensor of them) starts with a JPEG SOI marker."""
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.ndim != 1 or data.numel() < 3:
            return False
        return bytes(data[:3].tolist()) == _JPEG_SOI
    return bytes(data[:3]) == _JPEG_SOI


def _to_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def decode_batch(items: Sequence[torch.Tensor], device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """uint8 (3, H, W) RGB images on ``device``, in the order of ``items``.

    Each item is a 1-D uint8 tensor of encoded bytes, or an already decoded uint8 (3, H, W)
    image (moved to ``device``). All JPEG items are decoded in ONE
    ``torchcodec.decoders.decode_jpeg(list, mode="RGB", device=device)`` call (one nvJPEG
    batch on CUDA). Encoded non-JPEG items (a loader normally decodes those itself) are
    decoded on the CPU one by one with torchcodec's decode_image, then moved.
    """
    from torchcodec.decoders import decode_image, decode_jpeg

    device = _to_device(device)
    out: list[torch.Tensor | None] = [None] * len(items)
    jpeg_positions, jpeg_sources = [], []
    for position, item in enumerate(items):
        if not isinstance(item, torch.Tensor) or item.dtype != torch.uint8:
            raise TypeError(f"item {position}: expected a uint8 tensor, got {type(item).__name__} "
                            f"{getattr(item, 'dtype', '')}")
        if item.ndim == 1:
            if is_jpeg(item):
                jpeg_positions.append(position)
                jpeg_sources.append(item.cpu())
            else:
                out[position] = decode_image(item.cpu(), mode="RGB").to(device)
        elif item.ndim == 3 and item.shape[0] == 3:
            out[position] = item.to(device, non_blocking=True)
        else:
            raise ValueError(f"item {position}: expected encoded bytes (1-D) or (3, H, W), got {tuple(item.shape)}")
    if jpeg_sources:
        decoded = decode_jpeg(jpeg_sources, mode="RGB", device=device)
        for position, image in zip(jpeg_positions, decoded):
            out[position] = image
    return out  # type: ignore[return-value]
