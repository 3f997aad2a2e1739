"""The training curves as one image: matplotlib when it is installed, Pillow otherwise.

matplotlib is optional (most ComfyUI installs have it, the engine does not need it); it is used
through its object API (Figure + the Agg canvas), never pyplot, so no global state or backend of the
host process changes. Without it the same chart is drawn with Pillow.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

LOSS = (("loss", (150, 190, 225)), ("loss_ema", (31, 119, 180)))
ERRORS = (("err_model", (214, 39, 40)), ("err_ref", (44, 160, 44)))
DRIFT = (("drift", (148, 103, 189)),)
FIT = (("fit", (255, 127, 14)),)
PANELS = (("loss", LOSS, "DCO loss"), ("errors", ERRORS, "denoising error (MSE)"),
          ("prior drift", DRIFT, "drift"), ("fit", FIT, "fit"))
LEGEND = {"loss": "loss", "loss_ema": "loss (moving avg.)", "err_model": "err_model (LoRA on)",
          "err_ref": "err_ref (LoRA off)", "drift": "drift", "fit": "fit"}
WARN = (190, 90, 0)
PER_IMAGE_ROWS = 12  # the worst-fitting images drawn; the rest are counted
CLIP_QUANTILE = 0.98  # the loss axis ends a little above this quantile, so one spike cannot flatten the rest


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


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _points(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows if _finite(r.get(key)) and _finite(r.get("step"))]


def value_range(values: Sequence[float], clip: bool = False) -> tuple[float, float, int]:
    """(lo, hi, clipped): the axis range for `values`, a flat series given a band; with `clip` the top
    ends a little above the CLIP_QUANTILE quantile when the largest values lie far above it, and
    `clipped` counts the values left above the axis."""
    vals = sorted(v for v in values if _finite(v))
    if not vals:
        return 0.0, 1.0, 0
    lo, hi = vals[0], vals[-1]
    if clip and len(vals) >= 10:
        q = vals[min(len(vals) - 1, int(CLIP_QUANTILE * (len(vals) - 1)))]
        if hi - lo > 1e-12 and (hi - q) > 0.5 * (q - lo):  # a spike: more than half the body again
            hi = q + 0.1 * (q - lo)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    else:
        pad = 0.05 * (hi - lo)
        lo, hi = (max(0.0, lo - pad) if lo >= 0 else lo - pad), hi + pad
    return lo, hi, sum(v > hi for v in vals)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values (1, 2 or 5 times a power of ten) within [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _per_image_rows(per_image: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]]:
    rows = [r for r in per_image or () if isinstance(r, dict) and isinstance(r.get("name"), str)]
    return sorted(rows, key=lambda r: -(r["err_lora"] if _finite(r.get("err_lora")) else -math.inf))


def curve_image(history: Sequence[dict[str, Any]], title: str = "DCO training", size: tuple[int, int] = (640, 480),
                *, per_image: list[dict] | None = None, warnings: list[str] | None = None,
                renderer: str = "auto") -> Any:
    """The run as one PIL image: four panels with their own scales (the loss and its moving average
    on a clipped axis; err_model and err_ref; prior drift; fit), each with ticks, axis titles and a
    legend; below them, when given, the dataset `warnings` and each training image's final error
    with the LoRA on and off (`per_image`: [{name, err_lora, err_base}], worst fit first). The image
    grows in height for those. `renderer`: "auto" (matplotlib when installed), "matplotlib" or
    "pillow"."""
    if renderer not in ("auto", "matplotlib", "pillow"):
        raise ValueError(f"renderer must be 'auto', 'matplotlib' or 'pillow', not {renderer!r}")
    rows = with_ema(history)
    images = _per_image_rows(per_image)
    notes = [w for w in warnings or () if isinstance(w, str) and w]
    if renderer != "pillow":
        try:
            return _matplotlib_image(rows, title, size, images, notes)
        except ImportError:
            if renderer == "matplotlib":
                raise
    return _pillow_image(rows, title, size, images, notes)


def _extra_height(images: Sequence[dict[str, Any]], notes: Sequence[str]) -> tuple[int, int]:
    shown = min(len(images), PER_IMAGE_ROWS)
    return (14 * len(notes) + 6 if notes else 0), (48 + 18 * shown + (14 if len(images) > shown else 0) if images else 0)


def _panel_rows(rows: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in rows if "loss" in r] if name in ("loss", "errors") else [r for r in rows if "drift" in r]


# ----------------------------------------------------------------------------- matplotlib
def _matplotlib_image(rows, title, size, images, notes) -> Any:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # ImportError without matplotlib
    from matplotlib.figure import Figure
    from PIL import Image

    w, h = size
    note_h, table_h = _extra_height(images, notes)
    total_h = h + note_h + table_h
    fig = Figure(figsize=(w / 100, total_h / 100), dpi=100)
    FigureCanvasAgg(fig)
    fig.text(0.01, 1 - 6 / total_h, title, fontsize=10, va="top")
    top, bottom = 1 - 44 / total_h, (note_h + table_h + 40) / total_h
    grid = fig.add_gridspec(2, 2, left=0.1, right=0.98, top=top, bottom=bottom, hspace=0.45, wspace=0.28)
    for i, (name, series, ylabel) in enumerate(PANELS):
        ax = fig.add_subplot(grid[i // 2, i % 2])
        panel = _panel_rows(rows, name)
        ax.set_title(name, fontsize=9, loc="left")
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        drawn = False
        for key, colour in series:
            pts = _points(panel, key)
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = {"err_ref": dict(linestyle="--", linewidth=3.2, zorder=2),  # wide, under err_model
                     "loss": dict(linewidth=0.8, alpha=0.8)}.get(key, dict(linewidth=1.4, zorder=3))
            ax.plot(xs, ys, color=tuple(c / 255 for c in colour), label=LEGEND[key],
                    marker="o" if len(xs) == 1 else None, markersize=3, **style)
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5", fontsize=8)
            continue
        values = [v for key, _ in series for _, v in _points(panel, key)]
        if name == "errors" and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")  # errors of very different size (err_model far below err_ref) stay apart
        else:
            lo, hi, clipped = value_range(values, clip=name == "loss")
            ax.set_ylim(lo, hi)
            if clipped:
                ax.set_title(f"{name} (axis clipped: {clipped} higher point{'s' * (clipped > 1)})", fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="best", framealpha=0.7)
    if notes:
        for i, note in enumerate(notes):
            fig.text(0.01, (table_h + note_h - 12 - 14 * i) / total_h, f"warning: {note}", fontsize=8,
                     color=tuple(c / 255 for c in WARN), va="bottom")
    if images:
        shown = images[:PER_IMAGE_ROWS]
        ax = fig.add_axes((0.3, 40 / total_h, 0.66, (18 * len(shown)) / total_h))
        y = np.arange(len(shown))[::-1]
        lora = [r["err_lora"] if _finite(r.get("err_lora")) else np.nan for r in shown]
        base = [r["err_base"] if _finite(r.get("err_base")) else np.nan for r in shown]
        ax.barh(y + 0.2, lora, height=0.4, color=tuple(c / 255 for c in ERRORS[0][1]), label="with the LoRA")
        ax.barh(y - 0.2, base, height=0.4, color=tuple(c / 255 for c in ERRORS[1][1]), label="without (base)")
        ax.set_yticks(y, [r["name"][-40:] for r in shown], fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        more = f"; {len(images) - len(shown)} more not shown" if len(images) > len(shown) else ""
        ax.set_xlabel(f"final denoising error per training image (worst fit on top{more})", fontsize=8)
        ax.legend(fontsize=7, loc="lower right", framealpha=0.7)
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return Image.fromarray(rgba[..., :3].copy())


# ----------------------------------------------------------------------------- Pillow
def _pillow_panel(draw: Any, box: tuple[int, int, int, int], rows: Sequence[dict[str, Any]], series, title: str,
                  ylabel: str, clip: bool) -> None:
    x0, y0, x1, y1 = box
    pts = {k: _points(rows, k) for k, _ in series}
    values = [v for p in pts.values() for _, v in p]
    steps = [s for p in pts.values() for s, _ in p]
    lo, hi, clipped = value_range(values, clip=clip)
    head = title + (f" (axis clipped: {clipped} higher)" if clipped else "")
    draw.text((x0 + 4, y0 + 2), head, fill=(20, 20, 20))
    legend_x = x0 + 4 + int(draw.textlength(head)) + 12
    px0, py0, px1, py1 = x0 + 50, y0 + 30, x1 - 8, y1 - 26
    draw.rectangle((px0, py0, px1, py1), outline=(90, 90, 90))
    draw.text((x0 + 2, py0 - 12), ylabel, fill=(90, 90, 90))
    draw.text(((px0 + px1) // 2 - 12, y1 - 12), "step", fill=(90, 90, 90))
    for name, colour in series:  # the legend, on the title line
        draw.line((legend_x, y0 + 8, legend_x + 12, y0 + 8), fill=colour, width=3)
        draw.text((legend_x + 15, y0 + 2), LEGEND[name], fill=(60, 60, 60))
        legend_x += 15 + int(draw.textlength(LEGEND[name])) + 10
    if not values:
        draw.text((px0 + 6, py0 + 6), "no data", fill=(120, 120, 120))
        return
    s_lo, s_hi = min(steps), max(max(steps), min(steps) + 1)

    def xy(step: float, v: float) -> tuple[float, float]:
        v = min(max(v, lo), hi)  # clipped points sit on the axis edge
        return px0 + (step - s_lo) / (s_hi - s_lo) * (px1 - px0), py1 - (v - lo) / (hi - lo) * (py1 - py0)

    for tick in nice_ticks(lo, hi):
        _, ty = xy(s_lo, tick)
        draw.line((px0 - 3, ty, px0, ty), fill=(90, 90, 90))
        draw.line((px0 + 1, ty, px1 - 1, ty), fill=(232, 232, 232))
        draw.text((x0 + 2, ty - 5), f"{tick:.4g}", fill=(90, 90, 90))
    for tick in nice_ticks(s_lo, s_hi):
        tx, _ = xy(tick, lo)
        draw.line((tx, py1, tx, py1 + 3), fill=(90, 90, 90))
        draw.text((tx - 6, py1 + 4), f"{tick:g}", fill=(90, 90, 90))
    for name, colour in series:
        p = [xy(s, v) for s, v in pts[name]]
        width = 3 if name == "err_ref" else 1 if name == "loss" else 2  # err_ref drawn under, wider
        if len(p) > 1:
            draw.line(p, fill=colour, width=width)
        elif p:
            draw.ellipse((p[0][0] - 2, p[0][1] - 2, p[0][0] + 2, p[0][1] + 2), fill=colour)


def _pillow_image(rows, title, size, images, notes) -> Any:
    from PIL import Image, ImageDraw

    w, h = size
    note_h, table_h = _extra_height(images, notes)
    image = Image.new("RGB", (w, h + note_h + table_h), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((8, 4), title, fill=(0, 0, 0))
    top, bottom = 20, h - 4
    split = top + (bottom - top) // 2
    half = w // 2
    boxes = ((4, top, half - 2, split - 2), (half + 2, top, w - 4, split - 2),
             (4, split + 2, half - 2, bottom), (half + 2, split + 2, w - 4, bottom))
    # err_ref first so err_model draws over it but stays visibly narrower
    order = {"errors": tuple(reversed(ERRORS))}
    for box, (name, series, ylabel) in zip(boxes, PANELS):
        _pillow_panel(draw, box, _panel_rows(rows, name), order.get(name, series), name, ylabel, clip=name == "loss")
    y = h
    for note in notes:
        draw.text((8, y + 2), f"warning: {note}", fill=WARN)
        y += 14
    if images:
        y += 6
        shown = images[:PER_IMAGE_ROWS]
        draw.text((8, y), "final denoising error per training image, worst fit first:", fill=(20, 20, 20))
        for colour, label, x in ((ERRORS[0][1], "with the LoRA", 360), (ERRORS[1][1], "without (base)", 470)):
            draw.rectangle((x, y + 2, x + 10, y + 9), fill=colour)
            draw.text((x + 14, y), label, fill=(60, 60, 60))
        y += 18
        peak = max([r[k] for r in shown for k in ("err_lora", "err_base") if _finite(r.get(k))] or [1.0]) or 1.0
        bar0, bar1 = min(w // 3, 220), w - 70
        for r in shown:
            draw.text((8, y + 2), r["name"][-(bar0 // 6 - 1):], fill=(40, 40, 40))
            for k, colour, dy in (("err_lora", ERRORS[0][1], 1), ("err_base", ERRORS[1][1], 9)):
                v = r.get(k)
                if _finite(v):
                    draw.rectangle((bar0, y + dy, bar0 + max(1, int((bar1 - bar0) * max(v, 0) / peak)), y + dy + 6),
                                   fill=colour)
            draw.text((bar1 + 4, y + 2), "/".join(f"{r[k]:.3g}" if _finite(r.get(k)) else "-"
                                                   for k in ("err_lora", "err_base")), fill=(60, 60, 60))
            y += 18
        if len(images) > len(shown):
            draw.text((8, y), f"... and {len(images) - len(shown)} more images", fill=(100, 100, 100))
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
