"""Training augmentation that runs either in a loader worker or batched on the training device.

The random choices of one sample are drawn once, cheaply, into a parameter vector
(:func:`draw_params`, seeded per sample, no global RNG). The pixels are then computed by ONE
implementation, used by both paths:

- worker path: :func:`augment_one` (one decoded ``uint8 (3, H, W)`` CPU image);
- device path: :func:`decode_batch` (every JPEG of the batch in one TorchCodec call, on the
  device) then :func:`augment_batch` (per-sample crop+resize, then batched flip, colour jitter
  with per-sample factors and per-sample op order, grayscale).

``augment_one`` is ``augment_batch`` with a batch of one, so the two paths cannot drift.

Semantics are those of the torchvision v2 pipeline ``Augment.train_transform()`` (kept below
as the reference): with ``torch.manual_seed(seed)``, that pipeline draws exactly the numbers
``draw_params(..., seed)`` draws, in the same order, and ``augment_one`` gives the same uint8
pixels (tests/test_augment.py checks this). The colour ops reproduce
``torchvision.transforms.v2.functional`` on uint8 images:

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


def _per_sample(factors: torch.Tensor, images: torch.Tensor, dtype: torch.dtype, dims: int = 4) -> torch.Tensor:
    factors = torch.as_tensor(factors)
    return factors.to(device=images.device, dtype=dtype).reshape((-1,) + (1,) * (dims - 1))


def _luma(images: torch.Tensor) -> torch.Tensor:
    """float32 (N, 1, H, W) grayscale, the same float ops (and FMA roundings) as torchvision."""
    r, g, b = images.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(dim=-3)


def _blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """uint8 of clamp(fl32(fma(other, fl32(1 - ratio), fl32(images * fl32(ratio))))).

    torchvision's ``images.mul(r).add_(other, alpha=1 - r)`` is one FMA per element (CPU with
    FMA, CUDA). Here ``alpha`` differs per sample, so the FMA is done in float64: the product
    is exact there (uint8 x float32, or float32 x float32 <= 48 bits) and the sum is rounded
    once to float64, then to float32. That double rounding can differ from one FMA rounding
    only when the float64 sum lands exactly on a float32 rounding midpoint (about 2**-29 per
    value, and then only matters if it also moves the value across an integer).
    """
    scaled = images.mul(_per_sample(ratio, images, torch.float32))
    alpha = (1.0 - _per_sample(ratio, images, torch.float64)).to(torch.float32).to(torch.float64)
    fused = scaled.to(torch.float64).add_(other.to(torch.float64).mul(alpha))
    return fused.to(torch.float32).clamp_(0, 255).to(torch.uint8)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return images.mul(_per_sample(factors, images, torch.float32)).clamp_(0, 255).to(torch.uint8)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    gray = _luma(images).floor_()
    count = gray.shape[-1] * gray.shape[-2]
    # Integer-valued: the float64 sum is exact; float32 division as torch.mean on CPU.
    total = gray.sum(dim=(-3, -2, -1), keepdim=True, dtype=torch.float64).to(torch.float32)
    return _blend(images, total.div_(count), factors)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    return _blend(images, _luma(images).floor_(), factors)


_HSV_SELECT = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])  # (v,p,q,t) per sector


def adjust_hue(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    x = images.to(torch.float32).mul_(1.0 / 255.0)
    r, g, _ = x.unbind(dim=-3)
    minc, maxc = torch.aminmax(x, dim=-3)
    flat = maxc == minc
    span = maxc - minc
    sat = span / torch.where(flat, 1.0, maxc)
    rc, gc, bc = ((maxc.unsqueeze(-3) - x) / torch.where(flat, 1.0, span).unsqueeze(-3)).unbind(dim=-3)
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, (rc + 2.0) - bc, (gc + 4.0) - rc))
    hue = hue.mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    hue = hue.add_(_per_sample(factors, images, torch.float32, dims=3)).remainder_(1.0)
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


def horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


COLOR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # indexed by op id


# --------------------------------------------------------------------------------------------
# Crop + resize of a whole batch: two batched matrix products
# --------------------------------------------------------------------------------------------
#
# torchvision resizes a uint8 CPU image (``resized_crop`` / ``resize``, bilinear, antialias) with
# ATen's Pillow-SIMD kernel: per axis, a triangle filter whose support is the scale factor when
# downscaling (1 when upscaling), centres at ``scale * (i + 0.5)`` (align_corners=False),
# weights normalized to sum 1 and rounded to int16 at a precision ``p`` chosen from the largest
# weight; each output is ``(2**(p-1) + sum(pixel * weight)) >> p`` clamped to uint8, the
# horizontal pass first (to a uint8 buffer), then the vertical one. The weights below are
# computed with the same float64 operations for every sample at once, and each pass is ONE
# batched matrix product whose per-sample matrix holds those integers at the crop's columns
# (rows) of the padded batch, with the flip folded in. The products are exact: pixels are
# 8-bit integers and each weight is split into two parts of at most 8 bits (hi * 128 + lo), so
# every product and partial sum is an integer below 2**24, exact in float32 -- also where
# float32 matrix products run in TF32 or bf16 (8+ significant bits). Exact means independent of
# the summation order, the padding and the device: the same uint8 pixels as torchvision's CPU
# kernel for one image, in a batch of any size, on any device. (The lo part's sum stays below
# 2**24 while an output pixel reads at most 518 input pixels: a crop side up to 258 x the output
# side; beyond, float32 rounding may move a value by a fraction of a level.)

_LO_BITS = 7  # weight = hi * 2**7 + lo: hi < 2**8, lo < 2**7


def _axis_weights(in_sizes: torch.Tensor, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ATen's antialiased bilinear int16 weights for N input lengths -> ``out_size``, batched.

    Returns (first, weights, precision): int64 (N, S) index of each output's first tap, int64
    (N, S, K) weights (0 past each output's taps; K = the most taps in the batch) and int64
    (N,) precision bits. Same float64 operation sequence as ATen's
    ``_compute_indices_int16_weights_aa`` (UpSampleKernel.cpp).
    """
    length = in_sizes.to(torch.float64).unsqueeze(1)  # (N, 1)
    scale = length / out_size
    downscale = scale >= 1.0
    support = torch.where(downscale, scale, 1.0)
    invscale = torch.where(downscale, 1.0 / scale, 1.0)
    taps = int(support.max().ceil().item()) * 2 + 1
    center = scale * (torch.arange(out_size, dtype=torch.float64) + 0.5)  # (N, S)
    first = (center - support + 0.5).to(torch.int64).clamp_(min=0)  # C++ casts truncate, as .to()
    count = torch.minimum((center + support + 0.5).to(torch.int64), in_sizes.unsqueeze(1)) - first
    k = torch.arange(taps)
    distance = ((k + first.unsqueeze(-1)).to(torch.float64) - center.unsqueeze(-1) + 0.5) * invscale.unsqueeze(-1)
    weights = (1.0 - distance.abs()).clamp_(min=0.0)
    weights = torch.where(k < count.unsqueeze(-1), weights, 0.0)
    total = weights.cumsum(-1)[..., -1:]  # a sequential sum, as the C++ loop (cumsum is, on CPU)
    weights = torch.where(total != 0, weights / total, weights)
    # Precision: the first p < 22 where round(w_max * 2**(p + 1)) reaches 2**15, else 22.
    w_max = weights.flatten(1).amax(1, keepdim=True)
    reaches = (0.5 + w_max * torch.exp2(torch.arange(1, 23, dtype=torch.float64))) >= float(1 << 15)
    precision = torch.where(reaches.any(1), reaches.to(torch.int8).argmax(1), 22)
    weights = (0.5 + weights * torch.exp2(precision.to(torch.float64)).view(-1, 1, 1)).to(torch.int64)
    return first, weights, precision


def _pass_matrix(in_sizes: torch.Tensor, offsets: torch.Tensor, out_size: int, span: int,
                 reverse: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (N, span, 2S) matrices of one pass, and the (N,) int32 precision bits, on ``device``.

    Sample n reads ``in_sizes[n]`` positions from ``offsets[n]`` of a ``span``-long axis; output
    position j lands in column j (S - 1 - j where ``reverse``) holding the weight's hi part, and
    in column S + that holding its lo part.
    """
    first, weights, precision = _axis_weights(in_sizes, out_size)
    count, size, taps = weights.shape
    rows = (first + offsets.unsqueeze(1)).unsqueeze(-1) + torch.arange(taps)  # (N, S, K) input positions
    rows = rows.clamp_(max=span - 1)  # past-the-end taps have weight 0; scatter_add keeps the real one
    reverse = reverse.view(-1, 1, 1)
    rows = torch.where(reverse, rows.flip(1), rows)  # output j written to column S - 1 - j
    weights = torch.where(reverse, weights.flip(1), weights)
    index = torch.cat([rows, rows], dim=1).transpose(1, 2)  # (N, K, 2S): row of each (tap, column)
    values = torch.cat([weights >> _LO_BITS, weights & ((1 << _LO_BITS) - 1)], dim=1).transpose(1, 2)
    matrix = torch.zeros(count, span, 2 * size, dtype=torch.float32, device=device)
    matrix.scatter_add_(1, _to(index, device), _to(values.to(torch.float32), device))
    return matrix, _to(precision.to(torch.int32), device)


def _round_pass(sums: torch.Tensor, precision: torch.Tensor, dims: int) -> torch.Tensor:
    """uint8 of ``(2**(p-1) + hi * 2**7 + lo) >> p``, clamped, from float32 (..., 2S, ...) sums
    whose hi parts fill the first half of dimension ``dims`` and lo parts the second."""
    hi, lo = sums.to(torch.int32).chunk(2, dim=dims)
    shape = (-1,) + (1,) * (hi.ndim - 1)
    bias = (1 << (precision - 1)).view(shape)
    total = lo.add(hi, alpha=1 << _LO_BITS).add_(bias)
    return total.bitwise_right_shift_(precision.view(shape)).clamp_(0, 255).to(torch.uint8)


def _pad_batch(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """uint8 (N, 3, Hmax, Wmax), image n in the top-left corner, zeros elsewhere; two ops for
    any N: one flat concatenation of every image, scattered into place by a mask."""
    heights = torch.tensor([image.shape[-2] for image in images])
    widths = torch.tensor([image.shape[-1] for image in images])
    height, width = int(heights.max()), int(widths.max())
    device = images[0].device
    flat = torch._chunk_cat(list(images), 0, 1)[0]  # each image flattened in (C, H, W) order
    heights, widths = _to(heights, device).view(-1, 1, 1, 1), _to(widths, device).view(-1, 1, 1, 1)
    inside = ((torch.arange(height, device=device).view(1, 1, height, 1) < heights)
              & (torch.arange(width, device=device).view(1, 1, 1, width) < widths))  # (N, 1, H, W)
    padded = torch.zeros(len(images), 3, height, width, dtype=torch.uint8, device=device)
    return padded.masked_scatter_(inside, flat)


def _crop_resize_batch(images: Sequence[torch.Tensor], boxes: torch.Tensor, size: int,
                       flip: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S): each image's box (top, left, height, width: int64 (N, 4), CPU)
    resized to S x S as torchvision's resized_crop (bilinear, antialias), flipped where ``flip``.

    A constant number of ops for any N and any sizes: the padded batch is cut to the window
    spanning every box, then one matrix product per axis.
    """
    padded = _pad_batch(images)
    count, device = len(images), padded.device
    top, left, height, width = boxes.unbind(1)
    row0, col0 = int(top.min()), int(left.min())
    rows, cols = int((top + height).max()) - row0, int((left + width).max()) - col0
    window = padded[:, :, row0:row0 + rows, col0:col0 + cols]
    across, across_bits = _pass_matrix(width, left - col0, size, cols, flip, device)  # (N, cols, 2S)
    down, down_bits = _pass_matrix(height, top - row0, size, rows, torch.zeros_like(flip), device)
    # Horizontal pass (first, as ATen): (N, 3 * rows, cols) @ (N, cols, 2S).
    sums = torch.bmm(window.to(torch.float32).reshape(count, 3 * rows, cols), across)
    horizontal = _round_pass(sums, across_bits, dims=-1).view(count, 3, rows, size)
    # Vertical pass: (N, 2S, rows) @ (N, rows, 3 * S), channels moved next to the columns.
    lines = horizontal.permute(0, 2, 1, 3).to(torch.float32, memory_format=torch.contiguous_format)
    sums = torch.bmm(down.transpose(1, 2), lines.view(count, rows, 3 * size))  # (N, 2S, 3S)
    out = _round_pass(sums, down_bits, dims=1)  # (N, S, 3S)
    return out.view(count, size, 3, size).permute(0, 2, 1, 3).contiguous()


# --------------------------------------------------------------------------------------------
# The two paths
# --------------------------------------------------------------------------------------------


# On CPU, ops run on chunks of about this many elements (1 image at 224 px, 10 at 64 px):
# the float intermediates of a whole (64, 3, 224, 224) batch (tens of MB each) would leave the
# caches and be re-allocated from the OS on every op. Accelerators take the whole subset.
_CPU_CHUNK_ELEMENTS = 1 << 17


def _apply(out: torch.Tensor, rows: list[int], op, *args: torch.Tensor) -> None:
    """out[rows] = op(out[rows], *(arg[rows] for arg in args)), in place; args are (N,) CPU tensors."""
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
            view.copy_(op(view, *(_to(arg.narrow(0, first, count), out.device) for arg in args)))
            continue
        index_cpu = torch.tensor(part, dtype=torch.long)
        index = _to(index_cpu, out.device)
        result = op(out.index_select(0, index), *(_to(arg.index_select(0, index_cpu), out.device) for arg in args))
        out.index_copy_(0, index, result)


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
    Crop+resize runs per sample (sizes differ before it); flip, colour jitter (per-sample
    factors, applied in 4 rounds: round k applies each op to the samples whose order puts it
    at position k) and grayscale run on the whole batch or on index subsets of it.
    """
    if len(images) == 0:
        raise ValueError("empty batch")
    params, rows, size = _check_params(params, len(images))
    device = images[0].device
    for image in images:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3 or image.device != device:
            raise ValueError(f"expected uint8 (3, H, W) images on {device}, got {image.dtype} "
                             f"{tuple(image.shape)} on {image.device}")
    out = _crop_resize_batch(images, params[:, TOP:WIDTH + 1].to(torch.int64), size, params[:, FLIP] != 0)
    factors = params[:, FACTORS]
    jitter = [n for n, row in enumerate(rows) if row[JITTER]]
    for position in range(4):
        for op_id, op in enumerate(COLOR_OPS):
            selected = [n for n in jitter if int(rows[n][ORDER.start + position]) == op_id]
            _apply(out, selected, op, factors[:, op_id])
    _apply(out, [n for n, row in enumerate(rows) if row[GRAY]], to_grayscale)
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
    boxes = torch.tensor([[0, 0, image.shape[-2], image.shape[-1]] for image in images], dtype=torch.int64)
    out = _crop_resize_batch(images, boxes, size, torch.zeros(len(images), dtype=torch.bool))
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
