"""The claims in data_prep/images.py about the trainer's decoder (TorchCodec via decode_rgb), checked
by experiment, so a torchcodec upgrade that changes them fails here instead of in training."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from data_prep.images import MAX_PIXELS, AcceptedImage, RejectedImage, check_pixels, decode_rgb, prepare_image
from data_prep.keys import sanitize_key
from data_prep.synth import render_image
from data_prep.tarshard import split_member_name
from support.data_prep_samples import image_bytes, png_header_only

GOOD = ["jpeg", "jpeg_progressive", "jpeg_subsampled", "jpeg_gray", "jpeg_cmyk", "png", "png_rgba", "png_palette",
        "webp"]


def _torchvision_rgb(data: bytes) -> torch.Tensor:
    """The decode call the trainer used before TorchCodec: the reference for bit-identity."""
    from torchvision.io import ImageReadMode, decode_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


@pytest.mark.parametrize("kind", GOOD)
def test_decode_rgb_gives_rgb_uint8(kind):
    decoded = decode_rgb(image_bytes(kind))
    assert decoded.dtype == torch.uint8 and tuple(decoded.shape) == (3, 16, 16)
    verdict = prepare_image(image_bytes(kind))
    assert isinstance(verdict, AcceptedImage) and verdict.data == image_bytes(kind) and verdict.reencoded_from is None


@pytest.mark.parametrize("kind", GOOD)
def test_decode_rgb_is_bit_identical_to_torchvision(kind):
    data = image_bytes(kind, size=37, seed=3)
    assert torch.equal(decode_rgb(data), _torchvision_rgb(data))


def test_decode_rgb_is_bit_identical_to_torchvision_on_demo_images(tmp_path):
    for domain in ("photo", "cartoon", "sketch", "painting"):
        for index in range(3):
            path = tmp_path / f"{domain}{index}.jpg"
            render_image(domain, "house", index, image_size=64, seed=0).save(path, format="JPEG", quality=90)
            data = path.read_bytes()
            assert torch.equal(decode_rgb(data), _torchvision_rgb(data)), path.name


def test_decode_rgb_takes_bytes_or_a_uint8_tensor():
    data = image_bytes("jpeg")
    as_tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    assert torch.equal(decode_rgb(as_tensor), decode_rgb(data))
    with pytest.raises(ValueError, match="1-D uint8 tensor"):
        decode_rgb(as_tensor.to(torch.int32))
    with pytest.raises(ValueError, match="1-D uint8 tensor"):
        decode_rgb(str(Path("/some/file.jpg")))  # a str would be a path for torchcodec: refused


def test_decode_rgb_refuses_16bit_png_instead_of_rounding():
    with pytest.raises(ValueError, match="16-bit"):
        decode_rgb(image_bytes("png_16bit"))
    assert prepare_image(image_bytes("png_16bit")).kind == "unsupported_mode"


@pytest.mark.parametrize("kind, reason", [
    ("bmp", "not a JPEG, PNG or WebP image"), ("tiff", "not a JPEG, PNG or WebP image"),
    ("gif", "not a JPEG, PNG or WebP image"), ("jpeg_truncated", "jpg does not decode: Image is incomplete"),
    ("png_truncated", "png does not decode"), ("empty", "empty input"), ("text", "not a JPEG, PNG or WebP image"),
])
def test_decode_rgb_rejects_with_a_short_reason(kind, reason):
    with pytest.raises(ValueError, match=reason) as caught:
        decode_rgb(image_bytes(kind))
    assert "\n" not in str(caught.value) and ".cpp" not in str(caught.value)


def test_check_pixels_reads_the_header_only():
    assert check_pixels(image_bytes("jpeg", size=16)) == (16, 16)
    assert check_pixels(image_bytes("webp", size=20)) == (20, 20)
    assert check_pixels(image_bytes("bmp", size=12)) == (12, 12)
    assert check_pixels(png_header_only(9459, 9459)) == (9459, 9459)  # 89_472_681 px: just under the limit
    with pytest.raises(ValueError, match="9459x9460"):
        check_pixels(png_header_only(9459, 9460))
    with pytest.raises(ValueError, match=r"^too_many_pixels: 30000x30000 > 89478485$"):
        check_pixels(png_header_only(30000, 30000))
    with pytest.raises(ValueError, match=r"^too_many_pixels: 16x16 > 255$"):
        check_pixels(image_bytes("png"), limit=255)
    assert MAX_PIXELS == 89_478_485


def test_prepare_image_refuses_a_pixel_bomb_without_decoding(monkeypatch):
    import data_prep.images as images

    monkeypatch.setattr(images, "decode_rgb", lambda data: pytest.fail("decoded a pixel bomb"))
    verdict = prepare_image(png_header_only(30000, 30000))
    assert verdict == RejectedImage("too_many_pixels", "too_many_pixels: 30000x30000 > 89478485")
    assert prepare_image(image_bytes("bmp"), max_pixels=100).kind == "too_many_pixels"


def test_content_decides_the_extension_not_the_file_name():
    assert prepare_image(image_bytes("png")).extension == "png"
    assert prepare_image(image_bytes("webp")).extension == "webp"
    assert isinstance(prepare_image(image_bytes("tiff_cmyk")), RejectedImage)


@pytest.mark.parametrize("name, key", [
    ("photo/dog/pic.001 final.jpg", "photo-dog-pic_001_final"),
    ("a\\b:c*?.png", "a_b_c___png"),
])
def test_sanitized_keys_have_no_dots(name, key):
    assert sanitize_key(name.rsplit(".", 1)[0] if name.endswith(".jpg") else name) == key
    assert split_member_name(f"{key}.jpg") == (key, "jpg")
