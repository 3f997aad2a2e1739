"""The final curve image (dco_train/plot.py curve_image), on both renderers: matplotlib when it is
installed (skipped otherwise) and the Pillow drawing, which is forced here by hiding matplotlib."""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest

from dco_train import plot

W, H = 640, 480
PER_IMAGE = [{"name": f"img_{i}.png", "err_lora": 0.05 + 0.01 * i, "err_base": 0.12} for i in range(4)]
WARNINGS = ["only 2 images: a subject needs at least 3"]


def _history(steps: int = 60, spike_at: int | None = None, same_errors: bool = False) -> list[dict]:
    rows = [{"step": 0, "drift": 0.0, "fit": 0.5}]
    for s in range(1, steps + 1):
        err_model = 0.1 + 0.05 * math.exp(-s / 20)
        rows.append({"step": s, "loss": 0.69 - 0.002 * s + (50.0 if s == spike_at else 0.0), "err_model": err_model,
                     "err_ref": err_model if same_errors else 0.13})
        if s % 20 == 0:
            rows.append({"step": s, "drift": 0.001 * s, "fit": 0.5 - 0.002 * s})
    return rows


def _has(image, rgb: tuple[int, int, int], box=None, tol: int = 12) -> int:
    a = np.asarray(image.convert("RGB")).astype(int)
    if box:
        x0, y0, x1, y1 = box
        a = a[y0:y1, x0:x1]
    return int((np.abs(a - np.array(rgb)).max(axis=-1) <= tol).sum())


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Make `import matplotlib...` fail, as in an install without it."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)


RENDERERS = ["pillow", pytest.param("matplotlib", marks=pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib is not installed (optional; the Pillow drawing is the fallback)"))]


@pytest.mark.parametrize("renderer", RENDERERS)
def test_err_ref_stays_visible_when_err_model_lies_on_it(renderer):
    image = plot.curve_image(_history(same_errors=True), renderer=renderer)
    assert image.size == (W, H)
    errors_panel = (W // 2, 0, W, H // 2)
    assert _has(image, plot.ERRORS[0][1], errors_panel) > 50, "err_model is drawn"
    assert _has(image, plot.ERRORS[1][1], errors_panel) > 50, "err_ref shows beside err_model on the same values"


@pytest.mark.parametrize("renderer", RENDERERS)
def test_per_image_errors_and_warnings_are_drawn_below_the_curves(renderer):
    plain = plot.curve_image(_history(), renderer=renderer)
    full = plot.curve_image(_history(), per_image=PER_IMAGE, warnings=WARNINGS, renderer=renderer)
    assert full.size[0] == W and full.size[1] > plain.size[1] + 4 * 18, "the image grows for the table"
    below = (0, H, W, full.size[1])
    assert _has(full, plot.WARN, below) > 20, "the warning is written in the warning colour"
    assert _has(full, plot.ERRORS[0][1], below) > 200 and _has(full, plot.ERRORS[1][1], below) > 200, (
        "bars for the error with the LoRA on and off")
    assert _has(plain, plot.WARN) == 0
    only_warnings = plot.curve_image(_history(), warnings=WARNINGS, renderer=renderer)
    assert plain.size[1] < only_warnings.size[1] < full.size[1]


def test_pillow_table_puts_the_worst_fitting_image_first():
    image = plot.curve_image(_history(), per_image=PER_IMAGE, renderer="pillow")
    a = np.asarray(image).astype(int)
    red = (np.abs(a - np.array(plot.ERRORS[0][1])).max(axis=-1) <= 12)
    rows = [y for y in range(H, image.size[1]) if red[y].sum() > 0 and red[y, :200].sum() == 0]
    widths = [w for w in (int(red[y].sum()) for y in rows) if w > 20]  # bars, not the legend swatch
    assert widths and widths[0] == max(widths), "img_3 (highest err_lora) is the first, longest bar"


def test_a_loss_spike_clips_the_axis_instead_of_flattening_the_curve():
    values = [0.69 - 0.002 * s for s in range(60)] + [50.0]
    lo, hi, clipped = plot.value_range(values, clip=True)
    assert clipped == 1 and hi < 1.0 and lo > 0.5
    assert plot.value_range(values)[1] > 50, "without clip the range covers every value"
    assert plot.value_range([0.5] * 20, clip=True)[:2] == (0.25, 0.75), "a flat series gets a band"
    assert plot.value_range([])[:2] == (0.0, 1.0)


@pytest.mark.parametrize("lo, hi, ticks", [(0, 1, [0, 0.2, 0.4, 0.6, 0.8, 1.0]), (0.48, 0.93, [0.5, 0.6, 0.7, 0.8, 0.9]),
                                           (0, 200, [0, 50, 100, 150, 200]), (3, 3, [3])])
def test_ticks_are_round_numbers_inside_the_range(lo, hi, ticks):
    got = plot.nice_ticks(lo, hi)
    assert got == pytest.approx(ticks) and all(lo <= t <= hi for t in got)


def test_auto_falls_back_to_pillow_without_matplotlib(no_matplotlib):
    auto = plot.curve_image(_history(spike_at=30), per_image=PER_IMAGE, warnings=WARNINGS)
    pillow = plot.curve_image(_history(spike_at=30), per_image=PER_IMAGE, warnings=WARNINGS, renderer="pillow")
    assert np.array_equal(np.asarray(auto), np.asarray(pillow))
    with pytest.raises(ImportError):
        plot.curve_image(_history(), renderer="matplotlib")


def test_matplotlib_leaves_no_global_state():
    matplotlib = pytest.importorskip("matplotlib")
    had_pyplot = "matplotlib.pyplot" in sys.modules
    rc = dict(dict.items(matplotlib.rcParams))  # raw: reading rcParams["backend"] would import pyplot
    plot.curve_image(_history(spike_at=10), per_image=PER_IMAGE, renderer="matplotlib")
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot, "pyplot (and its figure registry) is not used"
    assert dict(dict.items(matplotlib.rcParams)) == rc, "no rcParams (backend, style) changed"


def test_bad_rows_and_renderer_names():
    rows = [{"step": 1, "loss": float("nan")}, {"step": 2, "loss": None}, {"step": 3, "loss": 0.5, "err_model": True}]
    assert plot.curve_image(rows, renderer="pillow", per_image=[{"name": "a", "err_lora": None, "err_base": 0.1},
                                                                {"no": "name"}]).size[0] == W
    with pytest.raises(ValueError, match="renderer must be"):
        plot.curve_image(rows, renderer="svg")
