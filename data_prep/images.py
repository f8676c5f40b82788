"""Decide, per source file, what goes into a shard: the bytes as they are, a lossless PNG, or nothing.

The trainer decodes with ``torchvision.io.decode_image(t, mode=ImageReadMode.RGB)`` and needs a
(3, H, W) uint8 tensor. What that call does was checked by experiment (torchvision 0.29.1,
tests/test_data_prep_images.py keeps the claims honest):

- JPEG (also grayscale, CMYK and progressive), PNG (RGB, gray, palette, with alpha) and WebP decode
  to RGB uint8: bytes are copied unchanged. Alpha is dropped by the decoder, not composited.
- 16-bit PNG decodes to uint16: SKIPPED (kind ``unsupported_mode``), since 16 -> 8 bit loses data.
- BMP, TIFF and other Pillow-readable formats fail in decode_image; GIF decodes but is not one of
  the shard extensions. A single-frame image in an 8-bit mode (RGB, L, P, 1, RGBA, LA) is
  RE-ENCODED as an RGB PNG: the pixels equal what decode_image would give for the same pixels in a
  PNG (alpha dropped), so nothing is lost. Other modes (CMYK TIFF, 16/32-bit, float) and
  multi-frame files are SKIPPED (``unsupported_mode``): no lossless 8-bit RGB form exists.
- Truncated or corrupt JPEG/PNG/WebP (decode_image raises) are SKIPPED (``corrupt_image``),
  zero-byte files (``empty_file``) and files no decoder recognizes (``not_an_image``) too.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

# Extensions a shard may hold, named the way webdataset's decoders expect them.
SHARD_IMAGE_EXTENSIONS = ("jpg", "png", "webp")
# Pillow modes whose conversion to 8-bit RGB keeps every pixel value (alpha is dropped, as
# decode_image drops it for PNG).
_LOSSLESS_TO_RGB_MODES = {"RGB", "L", "P", "1", "RGBA", "LA", "RGBX", "PA"}


@dataclass(frozen=True)
class AcceptedImage:
    data: bytes
    extension: str  # one of SHARD_IMAGE_EXTENSIONS
    reencoded_from: str | None = None  # e.g. "BMP RGB" when the bytes are a new PNG


@dataclass(frozen=True)
class RejectedImage:
    kind: str
    detail: str


def sniff_format(data: bytes) -> str | None:
    """The shard extension for JPEG/PNG/WebP content (ignoring the file name), else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def decode_rgb(data: bytes):
    """Exactly the trainer's decode call."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec on every call; the
        # trainer uses this call, so this check must too. Silenced here only, not process-wide.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        # frombuffer refuses an empty buffer; an empty tensor makes decode_image raise like any bad image
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return decode_image(tensor, mode=ImageReadMode.RGB)


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:200]


def prepare_image(data: bytes) -> AcceptedImage | RejectedImage:
    if not data:
        return RejectedImage("empty_file", "zero-byte file")
    extension = sniff_format(data)
    if extension is not None:
        try:
            decoded = decode_rgb(data)
        except RuntimeError as error:
            return RejectedImage("corrupt_image", f"{extension} does not decode: {_first_line(error)}")
        if str(decoded.dtype) != "torch.uint8":
            return RejectedImage("unsupported_mode",
                                 f"{extension} decodes to {decoded.dtype} (16-bit); no lossless 8-bit form")
        if decoded.ndim != 3 or decoded.shape[0] != 3:
            return RejectedImage("unsupported_mode", f"{extension} decodes to shape {tuple(decoded.shape)}")
        return AcceptedImage(data, extension)
    return _reencode_other_format(data)


def _reencode_other_format(data: bytes) -> AcceptedImage | RejectedImage:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        return RejectedImage("not_an_image", "no image decoder recognizes the content")
    except Exception as error:  # Pillow raises many types for broken files
        return RejectedImage("corrupt_image", f"does not decode: {_first_line(error)}")
    described = f"{image.format} {image.mode}"
    if getattr(image, "n_frames", 1) > 1:
        return RejectedImage("unsupported_mode", f"{described} with {image.n_frames} frames")
    if image.mode not in _LOSSLESS_TO_RGB_MODES:
        return RejectedImage("unsupported_mode", f"{described}: no lossless 8-bit RGB form")
    buffer = io.BytesIO()
    # Fixed settings and no metadata: the same input always gives the same PNG bytes.
    image.convert("RGB").save(buffer, format="PNG", compress_level=6)
    return AcceptedImage(buffer.getvalue(), "png", reencoded_from=described)
