"""Loss and drift curves drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import math
from typing import Any, Sequence

LOSS = (("loss", (150, 190, 225)), ("loss_ema", (31, 119, 180)))
ERRORS = (("err_model", (214, 39, 40)), ("err_ref", (44, 160, 44)))
DRIFT = (("drift", (148, 103, 189)),)
FIT = (("fit", (255, 127, 14)),)


def _panel(draw: Any, box: tuple[int, int, int, int], rows: Sequence[dict[str, Any]], series, title: str) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(90, 90, 90))
    draw.text((x0 + 6, y0 + 4), title, fill=(20, 20, 20))
    pts = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])] for k, _ in series}
    values = [v for p in pts.values() for _, v in p]
    steps = [s for p in pts.values() for s, _ in p]
    if not values:
        draw.text((x0 + 6, y0 + 24), "no data yet", fill=(120, 120, 120))
        return
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:  # a flat line (or a single step) still gets a visible band
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    s_lo, s_hi = min(steps), max(max(steps), min(steps) + 1)
    px0, py0, px1, py1 = x0 + 48, y0 + 22, x1 - 8, y1 - 18

    def xy(step: float, v: float) -> tuple[float, float]:
        return px0 + (step - s_lo) / (s_hi - s_lo) * (px1 - px0), py1 - (v - lo) / (hi - lo) * (py1 - py0)

    draw.text((x0 + 4, py0 - 4), f"{hi:.5g}", fill=(90, 90, 90))
    draw.text((x0 + 4, py1 - 8), f"{lo:.5g}", fill=(90, 90, 90))
    draw.text((px0, py1 + 4), f"step {s_lo}", fill=(90, 90, 90))
    draw.text((px1 - 60, py1 + 4), f"step {s_hi}", fill=(90, 90, 90))
    legend_x = x0 + 60
    for name, colour in series:
        p = [xy(s, v) for s, v in pts[name]]
        if len(p) > 1:
            draw.line(p, fill=colour, width=2)
        elif p:
            draw.ellipse((p[0][0] - 2, p[0][1] - 2, p[0][0] + 2, p[0][1] + 2), fill=colour)
        draw.text((legend_x, y0 + 4), name, fill=colour)
        legend_x += 8 * len(name) + 16


def with_ema(history: Sequence[dict[str, Any]], alpha: float = 0.1) -> list[dict[str, Any]]:
    """Rows with a `loss_ema` (exponential moving average): DCO's per-step loss is spiky."""
    out, ema = [], None
    for r in history:
        r = dict(r)
        if isinstance(r.get("loss"), (int, float)):
            ema = r["loss"] if ema is None else (1 - alpha) * ema + alpha * r["loss"]
            r["loss_ema"] = ema
        out.append(r)
    return out


def curve_image(history: Sequence[dict[str, Any]], title: str = "DCO training", size: tuple[int, int] = (640, 480)):
    """One PNG-ready image, four panels with their own scales: loss (and its moving average),
    err_model vs err_ref, prior drift, and fit."""
    from PIL import Image, ImageDraw

    w, h = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((8, 4), title, fill=(0, 0, 0))
    rows = with_ema(history)
    steps = [r for r in rows if "loss" in r]
    monitor = [r for r in rows if "drift" in r]
    top, bottom = 20, h - 4
    split = top + (bottom - top) * 2 // 3
    half = w // 2
    _panel(draw, (4, top, half - 2, split - 2), steps, LOSS, "loss")
    _panel(draw, (half + 2, top, w - 4, split - 2), steps, ERRORS, "errors")
    _panel(draw, (4, split + 2, half - 2, bottom), monitor, DRIFT, "prior drift")
    _panel(draw, (half + 2, split + 2, w - 4, bottom), monitor, FIT, "fit")
    return image


def image_grid(images: Sequence[Any], columns: int, labels: Sequence[str] = ()) -> Any:
    """Images side by side (rows of `columns`), each with an optional label above it."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    pad = 14 if labels else 0
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * w, rows * (h + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = (i % columns) * w, (i // columns) * (h + pad)
        grid.paste(im, (x, y + pad))
        if i < len(labels):
            draw.text((x + 2, y + 1), labels[i], fill=(0, 0, 0))
    return grid


def difference_tiles(images: Sequence[Any]) -> tuple[list[Any], float]:
    """Each image's absolute difference from the first, amplified so the largest change is bright.

    The demo's model has random weights, so reward guidance changes its pictures by a pixel value or
    two: invisible side by side, plain once amplified. Returns the tiles and the gain used."""
    import numpy as np
    from PIL import Image

    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]
    diffs = [np.abs(a - arrays[0]) for a in arrays]
    peak = max(float(d.max()) for d in diffs)
    gain = 255.0 / peak if peak > 0 else 1.0
    return [Image.fromarray(np.clip(d * gain, 0, 255).astype(np.uint8)) for d in diffs], gain


def rg_comparison(images: Sequence[Any], labels: Sequence[str], caption: str) -> Any:
    """The reward-guidance grid: a caption line, the images, and below each its difference from the first."""
    import textwrap

    from PIL import Image, ImageDraw

    tiles, gain = difference_tiles(images)
    top = image_grid(list(images), columns=len(images), labels=labels)
    bottom = image_grid(tiles, columns=len(images), labels=[f"|{lab} - {labels[0]}| x{gain:.0f}" for lab in labels])
    lines = textwrap.wrap(caption, width=max(20, top.width // 6))
    head = 12 * len(lines) + 6
    out = Image.new("RGB", (top.width, head + top.height + bottom.height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, 3 + 12 * i), line, fill=(0, 0, 0))
    out.paste(top, (0, head))
    out.paste(bottom, (0, head + top.height))
    return out
