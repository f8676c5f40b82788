"""Decide, per source file, what goes into a shard: the bytes as they are, a lossless PNG, or nothing.

The trainer decodes with :func:`decode_rgb` (TorchCodec's ``decode_jpeg`` / ``decode_png`` /
``decode_webp`` with ``mode="RGB"``) and needs a (3, H, W) uint8 tensor; it calls
:func:`check_pixels` first so that a small file with a huge header is refused before any pixel
memory is allocated. What the decoders do was checked by experiment (torchcodec 0.17,
tests/test_data_prep_images.py keeps the claims honest):

- JPEG (also grayscale, CMYK and progressive), PNG (RGB, gray, palette, with alpha) and WebP decode
  to RGB uint8: bytes are copied unchanged. Alpha is dropped by the decoder, not composited. For
  JPEG the pixels are bit-identical to torchvision's ``decode_image(..., ImageReadMode.RGB)``.
- 16-bit PNG: TorchCodec would scale it to 8 bits (lossy); :func:`decode_rgb` refuses it, so it is
  SKIPPED (kind ``unsupported_mode``), as it was with torchvision (which returned uint16).
- More than ``max_pixels`` pixels (default :data:`MAX_PIXELS`, Pillow's own bomb limit), read from
  the header before anything is decoded: SKIPPED (``too_many_pixels``).
- BMP, TIFF, GIF and other Pillow-readable formats are not shard formats: a single-frame image in an
  8-bit mode (RGB, L, P, 1, RGBA, LA) is RE-ENCODED as an RGB PNG; the pixels equal what the
  decoder gives for the same pixels in a PNG (alpha dropped), so nothing is lost. Other modes (CMYK
  TIFF, 16/32-bit, float) and multi-frame files are SKIPPED (``unsupported_mode``): no lossless
  8-bit RGB form exists.
- Truncated or corrupt JPEG/PNG/WebP (the decoder raises) are SKIPPED (``corrupt_image``),
  zero-byte files (``empty_file``) and files no decoder recognizes (``not_an_image``) too.
"""
from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

# Extensions a shard may hold, named the way webdataset's decoders expect them.
SHARD_IMAGE_EXTENSIONS = ("jpg", "png", "webp")
# Pillow modes whose conversion to 8-bit RGB keeps every pixel value (alpha is dropped, as
# the PNG decoder drops it).
_LOSSLESS_TO_RGB_MODES = {"RGB", "L", "P", "1", "RGBA", "LA", "RGBX", "PA"}
# Pillow's default Image.MAX_IMAGE_PIXELS (a 1024 MiB 24-bit image / 4 / 3): about 9459 x 9459.
# A decoded RGB image of this size takes 268 MB as uint8 (1 GB once converted to float32 in
# training), already far beyond what a classification trainer resizes from; no DG benchmark image
# comes close (DomainNet's largest are a few thousand px per side).
MAX_PIXELS = 89_478_485


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


def _as_bytes(data) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    import torch

    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.ndim != 1:
            raise ValueError(f"expected bytes or a 1-D uint8 tensor, got a {data.dtype} tensor of shape {tuple(data.shape)}")
        return data.cpu().numpy().tobytes()
    raise ValueError(f"expected bytes or a 1-D uint8 tensor, got {type(data).__name__}")


_NATIVE_LOCATION = re.compile(r"^.*?\.(?:cpp|h|c):\d+,\s*")


def _short_reason(error: Exception) -> str:
    """The last line of a decoder error without the C++ function/file prefix."""
    lines = str(error).strip().splitlines()
    text = _NATIVE_LOCATION.sub("", lines[-1]) if lines else type(error).__name__
    return text[:200]


def _header_size(data: bytes, extension: str | None) -> tuple[int, int]:
    """(width, height) from the header only. Pillow's plugin classes read the header and stop; calling
    them directly (instead of Image.open) skips Pillow's own bomb check, so any limit works."""
    from PIL import Image, UnidentifiedImageError

    if extension is not None:
        from PIL import JpegImagePlugin, PngImagePlugin, WebPImagePlugin

        plugin = {"jpg": JpegImagePlugin.JpegImageFile, "png": PngImagePlugin.PngImageFile,
                  "webp": WebPImagePlugin.WebPImageFile}[extension]
        try:
            return plugin(io.BytesIO(data)).size
        except Exception as error:  # Pillow raises many types for broken headers
            raise ValueError(f"{extension} header does not parse: {_short_reason(error)}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError as error:
        raise ValueError(f"too_many_pixels: {_short_reason(error)}") from None
    except UnidentifiedImageError:
        raise ValueError("no image decoder recognizes the content") from None
    except Exception as error:
        raise ValueError(f"header does not parse: {_short_reason(error)}") from None


def check_pixels(data: bytes, limit: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) read from the image header without decoding the pixels.

    Raises ValueError("too_many_pixels: WxH > LIMIT") when width * height exceeds `limit`, and
    ValueError with the reason when the header cannot be read. Cost: tens of microseconds.
    """
    data = _as_bytes(data)
    width, height = _header_size(data, sniff_format(data))
    if width * height > limit:
        raise ValueError(f"too_many_pixels: {width}x{height} > {limit}")
    return width, height


def decode_rgb(data) -> "torch.Tensor":
    """The trainer's decode call: JPEG, PNG or WebP bytes (or a 1-D uint8 tensor) -> uint8 (3, H, W) RGB.

    Raises ValueError with a short reason for anything else: not one of the three formats (sniffed
    from the content, not a name), a corrupt or truncated file, a 16-bit PNG (it has no lossless
    8-bit form) or an animated image. It does not check the pixel count: call check_pixels first
    on untrusted input.
    """
    from torchcodec.decoders import decode_jpeg, decode_png, decode_webp

    data = _as_bytes(data)
    if not data:
        raise ValueError("empty input")
    extension = sniff_format(data)
    if extension is None:
        raise ValueError("not a JPEG, PNG or WebP image")
    decoder = {"jpg": decode_jpeg, "png": decode_png, "webp": decode_webp}[extension]
    try:
        # "auto" keeps a 16-bit PNG at 16 bits so that it can be refused instead of silently rounded
        decoded = decoder(data, mode="RGB", output_dtype="auto")
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{extension} does not decode: {_short_reason(error)}") from None
    if str(decoded.dtype) != "torch.uint8":
        raise ValueError(f"{extension} decodes to {decoded.dtype} (16-bit); no lossless 8-bit form")
    if decoded.ndim != 3 or decoded.shape[0] != 3:
        raise ValueError(f"{extension} decodes to shape {tuple(decoded.shape)}, not (3, H, W)")
    return decoded


def prepare_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> AcceptedImage | RejectedImage:
    if not data:
        return RejectedImage("empty_file", "zero-byte file")
    extension = sniff_format(data)
    try:
        check_pixels(data, max_pixels)
    except ValueError as error:
        reason = str(error)
        if reason.startswith("too_many_pixels"):
            return RejectedImage("too_many_pixels", reason)
        if extension is not None:
            return RejectedImage("corrupt_image", reason)
        # other formats: the re-encoding path below tells not-an-image from corrupt
    if extension is not None:
        try:
            decode_rgb(data)
        except ValueError as error:
            reason = str(error)
            kind = "unsupported_mode" if "16-bit" in reason or "shape" in reason else "corrupt_image"
            return RejectedImage(kind, reason)
        return AcceptedImage(data, extension)
    return _reencode_other_format(data)


def _reencode_other_format(data: bytes) -> AcceptedImage | RejectedImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit was checked
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError:
        return RejectedImage("not_an_image", "no image decoder recognizes the content")
    except Exception as error:  # Pillow raises many types for broken files
        return RejectedImage("corrupt_image", f"does not decode: {_short_reason(error)}")
    described = f"{image.format} {image.mode}"
    if getattr(image, "n_frames", 1) > 1:
        return RejectedImage("unsupported_mode", f"{described} with {image.n_frames} frames")
    if image.mode not in _LOSSLESS_TO_RGB_MODES:
        return RejectedImage("unsupported_mode", f"{described}: no lossless 8-bit RGB form")
    buffer = io.BytesIO()
    # Fixed settings and no metadata: the same input always gives the same PNG bytes.
    image.convert("RGB").save(buffer, format="PNG", compress_level=6)
    return AcceptedImage(buffer.getvalue(), "png", reencoded_from=described)
