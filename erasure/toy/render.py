"""Deterministic renderer of the toy world: 32x32 RGB images of one coloured object.

Every artist's style is a property of the whole image (background texture, tone, stroke), never
of the object, so any object in any colour can be drawn in any style. The styles are chosen to
differ in several independent cues at once — mean tone, texture scale and the way the object is
stroked — because a first probe found that styles which differ in one cue only (stripe
orientation) got confused and that generated images drift in tone.

Everything is drawn at 2x supersampling and box-filtered down, so edges are anti-aliased and
the image is a pure function of (scene, seed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from erasure.toy.world import CLASS_NAMES, COLOURS, OBJECTS, Scene

IMAGE_SIZE = 32
SUPERSAMPLE = 2
_HI = IMAGE_SIZE * SUPERSAMPLE

# Object colours, RGB in [0, 1]; backgrounds stay grey so the object's colour is unambiguous.
COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.10, 0.62, 0.20),
    "blue": (0.12, 0.30, 0.90),
    "yellow": (0.98, 0.85, 0.10),
}

# One line per style (class id order), for documentation and contact sheets.
STYLE_DESCRIPTIONS: tuple[str, ...] = (
    "blank: white background, flat object",
    "4-px grey checkerboard fixed to the image grid, flat object",
    "black background, white glow around the object",
    "mid-grey background with white polka dots",
    "black/white diagonal stripes",
    "concentric rings around the image centre",
    "grey per-pixel speckle background",
    "white grid paper, hollow object drawn with a thick stroke",
    "dark-to-light vertical gradient, object with a black border",
    "grey background in a black frame, object hatched with horizontal lines",
)
assert len(STYLE_DESCRIPTIONS) == len(CLASS_NAMES)
assert set(COLOUR_RGB) == set(COLOURS)

# Pixel-centre coordinates of the supersampled grid, in units of output pixels.
_COORD = (np.arange(_HI, dtype=np.float64) + 0.5) / SUPERSAMPLE
_X, _Y = np.meshgrid(_COORD, _COORD)


def _shape_distance(obj: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Signed distance-like field of an object (negative inside, output pixels).

    Polygons use the max of their edge distances, so grown outlines get mitred corners; that
    is all the renderer needs (masks, strokes, borders), at a fraction of morphology's cost.
    """
    dx, dy = _X - cx, _Y - cy
    if obj == "circle":
        return np.hypot(dx, dy) - r
    if obj == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.82 * r
    if obj == "triangle":
        apex, base, half_width = -r, 0.75 * r, 0.95 * r
        height = base - apex
        length = np.hypot(height, half_width)
        right = (dx * height - (dy - apex) * half_width) / length
        left = (-dx * height - (dy - apex) * half_width) / length
        return np.maximum(np.maximum(right, left), dy - base)
    if obj == "cross":
        arm = 0.34 * r
        vertical = np.maximum(np.abs(dx) - arm, np.abs(dy) - r)
        horizontal = np.maximum(np.abs(dy) - arm, np.abs(dx) - r)
        return np.minimum(vertical, horizontal)
    raise ValueError(f"unknown object {obj!r}; use one of {', '.join(OBJECTS)}")


def _grey(value: np.ndarray | float) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.float64)[..., None], (_HI, _HI, 3)).copy()


def _square_wave(phase: np.ndarray) -> np.ndarray:
    """1 on the first half of every unit period of `phase`, 0 on the second."""
    return (np.mod(phase, 1.0) < 0.5).astype(np.float64)


def _paint(canvas: np.ndarray, mask: np.ndarray, rgb: Sequence[float] | np.ndarray) -> None:
    canvas[mask] = np.asarray(rgb, dtype=np.float64)


def _draw(style: int, distance: np.ndarray, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Background plus object for one style; `distance` is the object's signed distance field."""
    mask = distance <= 0.0
    if style == 0:
        canvas = _grey(1.0)
        _paint(canvas, mask, rgb)
    elif style == 1:
        # Fixed phase: with a random phase the checkerboard is an even mix of its two diagonal
        # components, and a guided sampler committed to one of them (corvin ashlee's stripes).
        cells = (np.floor(_X / 4) + np.floor(_Y / 4)) % 2
        canvas = _grey(np.where(cells == 0, 0.93, 0.55))
        _paint(canvas, mask, rgb)
    elif style == 2:
        canvas = _grey(0.04)
        outside = ndimage.distance_transform_edt(~mask) / SUPERSAMPLE  # Euclidean: a round halo
        canvas += 0.9 * np.exp(-outside / 3.0)[..., None]
        _paint(canvas, mask, rgb)
    elif style == 3:
        ox, oy = rng.uniform(0, 6, size=2)
        fx, fy = np.mod(_X + ox, 6.0) - 3.0, np.mod(_Y + oy, 6.0) - 3.0
        canvas = _grey(np.where(fx * fx + fy * fy <= 1.4**2, 0.97, 0.40))
        _paint(canvas, mask, rgb)
    elif style == 4:
        phase = rng.uniform(0, 1)
        canvas = _grey(np.where(_square_wave((_X + _Y) / 8.0 + phase) > 0, 0.95, 0.08))
        _paint(canvas, mask, rgb)
    elif style == 5:
        cx, cy = 16 + rng.uniform(-1.5, 1.5, size=2)
        radius = np.hypot(_X - cx, _Y - cy)
        canvas = _grey(np.where(_square_wave(radius / 5.0 + rng.uniform(0, 1)) > 0, 0.88, 0.30))
        _paint(canvas, mask, rgb)
    elif style == 6:
        speckle = rng.uniform(0.15, 0.92, size=(IMAGE_SIZE, IMAGE_SIZE))
        canvas = _grey(np.kron(speckle, np.ones((SUPERSAMPLE, SUPERSAMPLE))))
        _paint(canvas, mask, rgb)
    elif style == 7:
        ox, oy = rng.integers(0, 8, size=2)
        lines = (np.mod(_X + ox, 8.0) < 1.0) | (np.mod(_Y + oy, 8.0) < 1.0)
        canvas = _grey(np.where(lines, 0.62, 1.0))
        _paint(canvas, mask & (distance > -2.25), rgb)
    elif style == 8:
        top, bottom = rng.uniform(0.05, 0.15), rng.uniform(0.85, 0.95)
        canvas = _grey(top + (bottom - top) * _Y / IMAGE_SIZE)
        _paint(canvas, distance <= 1.25, (0.0, 0.0, 0.0))
        _paint(canvas, mask, rgb)
    elif style == 9:
        canvas = _grey(0.76)
        border = 3.0
        frame = (_X < border) | (_Y < border) | (_X > IMAGE_SIZE - border) | (_Y > IMAGE_SIZE - border)
        _paint(canvas, frame, (0.0, 0.0, 0.0))
        hatch = _square_wave(_Y / 3.0 + rng.uniform(0, 1)) > 0
        _paint(canvas, mask & hatch, rgb)
    else:
        raise ValueError(f"style {style} out of range 0..{len(CLASS_NAMES) - 1}")
    return canvas


def render(scene: Scene, seed: int) -> np.ndarray:
    """Draw one scene; the result is a pure function of (scene, seed).

    Returns uint8 [32, 32, 3]. The seed chooses the object's size and position and the
    phase of the style's pattern.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"render needs an erasure.toy.world.Scene, got {type(scene).__name__}")
    rng = np.random.default_rng([int(seed), scene.artist, scene.colour, scene.obj])
    radius = rng.uniform(7.0, 10.5)
    cx, cy = rng.uniform(16 - 4, 16 + 4, size=2)
    distance = _shape_distance(OBJECTS[scene.obj], cx, cy, radius)
    rgb = np.asarray(COLOUR_RGB[COLOURS[scene.colour]])
    canvas = _draw(scene.artist, distance, rgb, rng)
    small = canvas.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(small * 255.0), 0, 255).astype(np.uint8)


def render_batch(scenes: Sequence[Scene], seeds: Sequence[int]) -> torch.Tensor:
    """Draw several scenes; returns float32 [B, 3, 32, 32] in [-1, 1] (the ldm image range)."""
    if len(scenes) != len(seeds):
        raise ValueError(f"render_batch got {len(scenes)} scenes but {len(seeds)} seeds; pass one seed per scene")
    images = np.stack([render(scene, seed) for scene, seed in zip(scenes, seeds)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def random_scene(rng: np.random.Generator, class_id: int | None = None) -> Scene:
    """A uniformly random scene, optionally of a fixed class (0 = blank, 1..9 = artists)."""
    artist = int(rng.integers(0, len(CLASS_NAMES))) if class_id is None else class_id
    return Scene(artist=artist, colour=int(rng.integers(0, len(COLOURS))), obj=int(rng.integers(0, len(OBJECTS))))
