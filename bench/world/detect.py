"""Detectors that read the renderer's rules back from the pixels of one world image.

The background is the most common border colour (snapped to the background palette), the object
is every pixel far from the background and from the style's stripe colour, its position is the
nearest slot to its centroid, its colour is the nearest palette colour to its median, and its
shape is the template (rendered by the world's own `shape_mask`) with the best overlap. The subject
is a diamond whose upper half is the first tone and lower half the second; its `pattern` is those
two tones in that order, whatever the shape (a codec or a rough sample blurs shapes first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import (BACKGROUNDS, COLOURS, EXTRA_COLOURS, POSITIONS, SHAPES, SIZE, STYLE_STRIPE, SUBJECT_SHAPE,
               SUBJECT_TONES, shape_mask)

OBJECT_DISTANCE = 70.0  # RGB distance from the background beyond which a pixel is the object's
MIN_OBJECT_PIXELS = 15  # a shape of radius 6 covers 45-130 pixels


@dataclass
class Reading:
    background: str
    position: str | None
    colour: str | None
    shape: str | None
    subject: bool
    stripes: bool
    iou: float
    pattern: bool = False  # the subject's two tones, top over bottom, in any shape

    def scene(self) -> tuple:
        """What was drawn, without the shape-overlap score (that differs on any change of pixels)."""
        return (self.background, self.position, self.colour, self.shape, self.subject, self.stripes)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(palette)
    d = np.linalg.norm(np.asarray([palette[n] for n in names], np.float32) - rgb[None].astype(np.float32), axis=1)
    return names[int(d.argmin())], float(d.min())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


def best_shape(mask: np.ndarray) -> tuple[str, float]:
    """The shape whose template, slid over a few pixels around the mask's box centre, overlaps it most."""
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2
    best = ("", 0.0)
    for shape in SHAPES + (SUBJECT_SHAPE,):
        for dy in (-2, -1, 0, 1, 2):
            for dx in (-1, 0, 1):
                score = _iou(mask, shape_mask(shape, cx + dx, cy + dy))
                if score > best[1]:
                    best = (shape, score)
    return best


def read(image: Image.Image | np.ndarray) -> Reading:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image).astype(np.float32)
    assert arr.shape[:2] == (SIZE, SIZE), arr.shape
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    stripe = np.linalg.norm(border - np.asarray(STYLE_STRIPE, np.float32), axis=1) < 40
    bg_pixels = border[~stripe] if (~stripe).sum() > 8 else border
    background, _ = _nearest(np.median(bg_pixels, axis=0), BACKGROUNDS)
    bg_rgb = np.asarray(BACKGROUNDS[background], np.float32)
    far_bg = np.linalg.norm(arr - bg_rgb, axis=2) > OBJECT_DISTANCE
    near_stripe = np.linalg.norm(arr - np.asarray(STYLE_STRIPE, np.float32), axis=2) < 40
    mask = far_bg & ~near_stripe
    stripes = bool(near_stripe[~mask].mean() > 0.2)
    if mask.sum() < MIN_OBJECT_PIXELS:
        return Reading(background, None, None, None, False, stripes, 0.0)
    # A blurred edge is the object's where it is more than halfway from the background to the object:
    # the fixed distance above would dilate a blurred shape (and round a diamond into a circle).
    dist = np.linalg.norm(arr - bg_rgb, axis=2)
    halfway = mask & (dist > 0.5 * np.median(dist[mask]))
    if halfway.sum() >= MIN_OBJECT_PIXELS:
        mask = halfway
    ys, xs = np.nonzero(mask)
    position = min(POSITIONS, key=lambda p: abs(POSITIONS[p] - xs.mean()))
    colour, _ = _nearest(np.median(arr[mask], axis=0), {**COLOURS, **EXTRA_COLOURS})
    shape, iou = best_shape(mask)
    cy = (ys.min() + ys.max()) / 2
    top = _nearest(np.median(arr[mask & (np.arange(SIZE)[:, None] < cy)], axis=0), {**COLOURS, **EXTRA_COLOURS})[0]
    bottom = _nearest(np.median(arr[mask & (np.arange(SIZE)[:, None] > cy)], axis=0), {**COLOURS, **EXTRA_COLOURS})[0]
    pattern = (top, bottom) == SUBJECT_TONES
    return Reading(background, position, colour, shape, shape == SUBJECT_SHAPE and pattern, stripes, iou, pattern)
