"""The claims in data_prep/images.py about torchvision's decode_image(mode=RGB), checked by experiment,
so a torchvision upgrade that changes them fails here instead of in training."""
from __future__ import annotations

import pytest

from data_prep.images import AcceptedImage, RejectedImage, decode_rgb, prepare_image
from data_prep.keys import sanitize_key
from data_prep.tarshard import split_member_name
from data_prep.testing import image_bytes


@pytest.mark.parametrize("kind", ["jpeg", "jpeg_gray", "jpeg_cmyk", "png", "png_rgba", "png_palette", "webp"])
def test_decode_image_gives_rgb_uint8(kind):
    decoded = decode_rgb(image_bytes(kind))
    assert decoded.dtype.is_floating_point is False and str(decoded.dtype) == "torch.uint8"
    assert tuple(decoded.shape) == (3, 16, 16)
    verdict = prepare_image(image_bytes(kind))
    assert isinstance(verdict, AcceptedImage) and verdict.data == image_bytes(kind) and verdict.reencoded_from is None


def test_decode_image_gives_uint16_for_16bit_png():
    assert str(decode_rgb(image_bytes("png_16bit")).dtype) == "torch.uint16"


@pytest.mark.parametrize("kind", ["bmp", "tiff", "jpeg_truncated", "png_truncated", "empty", "text"])
def test_decode_image_rejects(kind):
    with pytest.raises(RuntimeError):
        decode_rgb(image_bytes(kind))


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
