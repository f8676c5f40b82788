"""The four demo styles. Each changes what a network can rely on, so the domains really shift:

- photo:    class-typical colours, shading, fine texture, soft shadow, textured background; no outline
- cartoon:  flat RANDOM colours with thick black outlines on a flat background (colour is useless)
- sketch:   wobbly grey pencil outlines (sometimes hatching) on white paper; no colour, no fill
- painting: class-typical colours with strong hue jitter, brush strokes everywhere, soft edges

A style is a function (parts, canvas size, class name, rng) -> RGB PIL image.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_prep.synth_shapes import CLASS_COLOURS, Part


def _mask(points: np.ndarray, size: int) -> np.ndarray:
    image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(image).polygon([tuple(p) for p in points], fill=255)
    return np.asarray(image, dtype=np.float32)[..., None] / 255.0


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], (size, size, 1)."""
    grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((size, size), Image.BICUBIC), dtype=np.float32)[..., None] / 255.0


def _jitter(colour, rng: np.random.Generator, amount: float) -> np.ndarray:
    return np.clip(np.array(colour, dtype=np.float32) + rng.normal(0, amount, 3), 0, 255)


def _part_colour(role: str, class_name: str, rng, amount: float) -> np.ndarray:
    main, second = CLASS_COLOURS[class_name]
    base = {"main": main, "second": second, "dark": (40, 35, 30)}[role]
    return _jitter(base, rng, amount if role != "dark" else 10)


def _to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB")


def photo(parts: list[Part], size: int, class_name: str, rng: np.random.Generator) -> Image.Image:
    top, bottom = _jitter((150, 160, 150), rng, 45), _jitter((110, 100, 90), rng, 45)
    ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    canvas = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (size, size, 3)).copy()
    canvas *= 0.75 + 0.5 * _smooth_noise(rng, size, 6)
    canvas += rng.normal(0, 6, (size, size, 1))
    union = np.clip(sum(_mask(p, size) for _, p in parts), 0, 1)
    shadow = np.asarray(Image.fromarray((union[..., 0] * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(size / 24)),
                        dtype=np.float32)[..., None] / 255.0
    shift = int(size * 0.04)
    canvas *= 1 - 0.45 * np.roll(shadow, (shift, shift), axis=(0, 1))
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    light = (0.8 + 0.5 * (xx * direction[0] + yy * direction[1]))[..., None]
    for role, points in parts:
        mask = _mask(points, size)
        surface = _part_colour(role, class_name, rng, 18) * light * (0.9 + 0.2 * _smooth_noise(rng, size, 12))
        surface += rng.normal(0, 10, (size, size, 3))
        canvas = canvas * (1 - mask) + surface * mask
    return _to_image(canvas).filter(ImageFilter.GaussianBlur(0.6))


CARTOON_PALETTE = [(230, 40, 40), (40, 120, 230), (250, 200, 20), (40, 180, 80), (240, 120, 20),
                   (160, 60, 200), (240, 100, 170), (30, 190, 200), (250, 250, 250)]


def cartoon(parts: list[Part], size: int, class_name: str, rng: np.random.Generator) -> Image.Image:
    background = tuple(int(c) for c in _jitter((225, 235, 245), rng, 15))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    width = max(2, size // 28)
    for role, points in parts:
        colour = (30, 30, 30) if role == "dark" else CARTOON_PALETTE[rng.integers(len(CARTOON_PALETTE))]
        draw.polygon([tuple(p) for p in points], fill=colour)
        draw.line([tuple(p) for p in points] + [tuple(points[0])], fill=(0, 0, 0), width=width, joint="curve")
    return image


def _wobbly(points: np.ndarray, rng: np.random.Generator, amount: float) -> list[tuple[float, float]]:
    closed = np.vstack([points, points[:1]])
    dense = []
    for a, b in zip(closed[:-1], closed[1:]):
        steps = max(2, int(np.linalg.norm(b - a) / 6))
        dense += [tuple(a + (b - a) * t) for t in np.linspace(0, 1, steps, endpoint=False)]
    dense.append(tuple(closed[-1]))
    drift = np.cumsum(rng.normal(0, amount, (len(dense), 2)), axis=0) * 0.5
    return [tuple(np.array(p) + d) for p, d in zip(dense, drift)]


def sketch(parts: list[Part], size: int, class_name: str, rng: np.random.Generator) -> Image.Image:
    paper = (245 + rng.normal(0, 4, (size, size, 1))).repeat(3, axis=2)
    image = _to_image(paper)
    draw = ImageDraw.Draw(image)
    width = max(1, size // 64)
    for _, points in parts:
        for _ in range(int(rng.integers(1, 3))):
            grey = int(rng.integers(20, 110))
            draw.line(_wobbly(points, rng, size / 256), fill=(grey, grey, grey), width=width)
    if rng.random() < 0.5:  # hatching inside the main part: texture without colour
        role, points = next(p for p in parts if p[0] == "main")
        hatch = Image.new("L", (size, size), 0)
        hatch_draw = ImageDraw.Draw(hatch)
        for offset in range(-size, size, max(3, size // 16)):
            hatch_draw.line([(offset, size), (offset + size, 0)], fill=120, width=width)
        mask = Image.fromarray((_mask(points, size)[..., 0] * 255).astype(np.uint8))
        image.paste((90, 90, 90), (0, 0), Image.fromarray(np.minimum(np.asarray(hatch), np.asarray(mask))))
    return image


def painting(parts: list[Part], size: int, class_name: str, rng: np.random.Generator) -> Image.Image:
    base = _jitter((170, 150, 120), rng, 45)
    canvas = np.ones((size, size, 3), dtype=np.float32) * base * (0.8 + 0.4 * _smooth_noise(rng, size, 5))
    for role, points in parts:
        mask = _mask(points, size)
        canvas = canvas * (1 - mask) + _part_colour(role, class_name, rng, 45) * mask
    image = _to_image(canvas).filter(ImageFilter.GaussianBlur(size / 60))
    draw = ImageDraw.Draw(image)
    pixels = np.asarray(image)
    stroke = max(2, size // 28)
    for _ in range(int(size * 1.5)):  # brush strokes pick up the colour beneath them: texture, soft edges
        x, y = rng.uniform(0, size, 2)
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.03, 0.09) * size
        colour = _jitter(pixels[int(y) % size, int(x) % size], rng, 18)
        end = (x + length * np.cos(angle), y + length * np.sin(angle))
        draw.line([(x, y), end], fill=tuple(int(c) for c in colour), width=stroke)
    return image


STYLES = {"photo": photo, "cartoon": cartoon, "sketch": sketch, "painting": painting}
