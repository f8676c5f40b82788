"""Geometry of the demo dataset's object classes, as polygons in unit coordinates.

Each class is a few parts (polygons in [-1, 1]^2, y pointing down) with a colour role:
"main" and "second" take the object's colours, "dark" is a detail (door, eye, wheels).
`place_object` puts a class at a random pose: rotation, scale, aspect and position jitter, so the
class is carried by the silhouette, not by where or how large it is drawn.
"""
from __future__ import annotations

import math

import numpy as np

Part = tuple[str, np.ndarray]  # (colour role, (N, 2) polygon)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=float)


def _ellipse(cx: float, cy: float, rx: float, ry: float, start: float = 0.0, end: float = 360.0,
             points: int = 40) -> np.ndarray:
    angles = np.radians(np.linspace(start, end, points, endpoint=end - start < 360))
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)


def _star(points: int = 5, outer: float = 0.95, inner: float = 0.4) -> np.ndarray:
    angles = [-math.pi / 2 + i * math.pi / points for i in range(2 * points)]
    return np.array([((outer if i % 2 == 0 else inner) * math.cos(a), (outer if i % 2 == 0 else inner) * math.sin(a))
                     for i, a in enumerate(angles)])


CLASS_PARTS: dict[str, list[Part]] = {
    "car": [("main", _rect(-0.9, -0.05, 0.9, 0.4)),
            ("second", np.array([(-0.45, -0.05), (-0.3, -0.45), (0.35, -0.45), (0.5, -0.05)])),
            ("dark", _ellipse(-0.5, 0.45, 0.22, 0.22)), ("dark", _ellipse(0.5, 0.45, 0.22, 0.22))],
    "fish": [("main", _ellipse(-0.15, 0.0, 0.62, 0.36)),
             ("second", np.array([(0.4, 0.0), (0.92, -0.45), (0.92, 0.45)])),
             ("dark", _ellipse(-0.5, -0.08, 0.08, 0.08))],
    "house": [("main", _rect(-0.6, -0.1, 0.6, 0.85)),
              ("second", np.array([(-0.85, -0.1), (0.0, -0.85), (0.85, -0.1)])),
              ("dark", _rect(-0.15, 0.35, 0.15, 0.85))],
    "star": [("main", _star())],
    "tree": [("second", _rect(-0.14, 0.15, 0.14, 0.95)),
             ("main", _ellipse(0.0, -0.25, 0.62, 0.6))],
    "umbrella": [("main", _ellipse(0.0, 0.0, 0.9, 0.65, 180.0, 360.0, 30)),
                 ("dark", _rect(-0.05, 0.0, 0.05, 0.8)),
                 ("dark", _rect(-0.25, 0.72, 0.05, 0.82))],
}
CLASSES = sorted(CLASS_PARTS)

# Class-typical colours (main, second): a shortcut available in some styles only.
CLASS_COLOURS = {
    "car": ((40, 80, 200), (150, 190, 230)),
    "fish": ((240, 130, 30), (250, 200, 60)),
    "house": ((180, 70, 50), (90, 90, 100)),
    "star": ((245, 210, 40), (250, 240, 150)),
    "tree": ((40, 150, 50), (110, 70, 30)),
    "umbrella": ((140, 50, 170), (230, 120, 200)),
}


def place_object(class_name: str, canvas: int, rng: np.random.Generator) -> list[Part]:
    """The class's parts in pixel coordinates of a canvas x canvas image, at a random pose."""
    angle = math.radians(rng.uniform(-25, 25))
    scale = canvas / 2 * rng.uniform(0.55, 0.8)
    aspect = rng.uniform(0.85, 1.15)
    centre = canvas / 2 + rng.uniform(-0.12, 0.12, size=2) * canvas
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    stretch = np.array([aspect, 1 / aspect])
    return [(role, (points * stretch) @ rotation.T * scale + centre) for role, points in CLASS_PARTS[class_name]]
