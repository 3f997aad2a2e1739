"""`python -m dco_train demo`: the whole machinery on a tiny random SDXL, in about a minute on a CPU.

It draws a synthetic subject (a yellow star, captions with `<obj>`) and a one-image style
(orange/purple stripes), trains both with DCO, writes LoRAs, embeddings, logs and a loss-curve PNG,
and renders reward-guidance grids (rg 0 / 1.5 / 3) for the subject and for subject + style merged.
The model has random weights, so the pictures show the pipeline working, not image quality.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESOLUTION = 64
SUBJECT = [  # (background colour, caption)
    ((40, 90, 200), "a photo of a <obj> on a blue background"),
    ((240, 240, 245), "a photo of a <obj> in the snow"),
    ((60, 160, 60), "a photo of a <obj> on the grass"),
    ((170, 40, 40), "a photo of a <obj> in front of a red wall"),
]
STYLE_CAPTION = "a house in flat stripe pattern style"


def _star(draw: Any, cx: float, cy: float, r: float) -> None:
    import math

    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    draw.polygon(pts, fill=(250, 210, 30), outline=(200, 30, 30))


def make_datasets(root: Path) -> tuple[Path, Path]:
    """Write the synthetic subject and style folders (images with .txt captions)."""
    from PIL import Image, ImageDraw

    subject, style = root / "data" / "subject", root / "data" / "style"
    subject.mkdir(parents=True, exist_ok=True)
    style.mkdir(parents=True, exist_ok=True)
    for i, (colour, caption) in enumerate(SUBJECT):
        im = Image.new("RGB", (96, 96), colour)
        _star(ImageDraw.Draw(im), 40 + 6 * i, 48 - 3 * i, 26 + 2 * i)
        im.save(subject / f"star_{i}.png")
        (subject / f"star_{i}.txt").write_text(caption + "\n", encoding="utf-8")
    im = Image.new("RGB", (96, 96), (250, 140, 40))
    d = ImageDraw.Draw(im)
    for x in range(-96, 96, 16):
        d.polygon([(x, 96), (x + 8, 96), (x + 104, 0), (x + 96, 0)], fill=(120, 50, 160))
    d.rectangle((30, 50, 66, 84), fill=(250, 240, 220))
    d.polygon([(24, 52), (48, 28), (72, 52)], fill=(40, 40, 40))
    im.save(style / "stripes.png")
    (style / "stripes.txt").write_text(STYLE_CAPTION + "\n", encoding="utf-8")
    return subject, style


def _rg_grid(comps: Any, prompt: str, word_map: dict[str, str], models: str, seed: int = 7):
    """rg 0 / 1.5 / 3 side by side, each tile's amplified difference from rg 0 below, and a caption."""
    from .plot import rg_comparison
    from .sample import SampleSettings, rg_sample

    images, labels = [], []
    for rg in (0.0, 1.5, 3.0):
        s = SampleSettings(prompt=prompt, rg=rg, cfg=5.0, steps=20, seed=seed, width=RESOLUTION, height=RESOLUTION)
        images += rg_sample(comps, s, word_map)
        labels.append(f"rg {rg:g}")
    caption = f'"{prompt}" with {models}; seed {seed}, cfg 5. Bottom row: the change from rg 0, amplified.'
    return rg_comparison([im.resize((128, 128), resample=0) for im in images], labels, caption)


def run_demo(output: Path, steps: int = 40) -> dict[str, Any]:
    from .config import TrainConfig
    from .plot import curve_image, image_grid
    from .sample import load_adapters
    from .tiny import build_tiny_sdxl
    from .train import RunOptions, train

    t0 = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    subject_dir, style_dir = make_datasets(output)
    tok_dir = output / "tiny-tokenizer"
    common = dict(resolution=RESOLUTION, max_train_steps=steps, checkpointing_steps=max(1, steps // 2),
                  checkpoints_total_limit=1, drift_every=max(1, steps // 4), mixed_precision="no",
                  learning_rate=1e-3, text_encoder_lr=1e-3, rank=8)  # toy model: larger steps than the recipe
    runs: dict[str, Any] = {}
    for name, cfg in (
        ("subject", TrainConfig.subject(data_dir=str(subject_dir), tokens={"<obj>": "star"}, **common)),
        ("style", TrainConfig.style(data_dir=str(style_dir), **common)),
    ):
        log.info("Training the %s (%d steps)", name, steps)
        res = train(cfg, build_tiny_sdxl(seed=0, tokenizer_dir=tok_dir),
                    RunOptions(output_dir=output / name, progress_bar=False, log_with=None))
        runs[name] = res
    curves = [curve_image(runs[n].history, f"{n}: DCO on a tiny random SDXL") for n in ("subject", "style")]
    loss_png = output / "loss_curves.png"
    image_grid(curves, columns=1).save(loss_png)

    log.info("Rendering reward-guidance grids")
    comps = build_tiny_sdxl(seed=0, tokenizer_dir=tok_dir)
    loaded = load_adapters(comps, [(runs["subject"].lora, 1.0)], runs["subject"].embeddings)
    rg_subject = output / "rg_subject.png"
    _rg_grid(comps, "a photo of a <obj> on the beach", loaded.word_map, "the subject LoRA + <obj> tokens alone").save(rg_subject)
    merged = build_tiny_sdxl(seed=0, tokenizer_dir=tok_dir)
    loaded = load_adapters(merged, [(runs["subject"].lora, 1.0), (runs["style"].lora, 1.0)], runs["subject"].embeddings)
    rg_merge = output / "rg_subject_style.png"
    _rg_grid(merged, "a <obj> in flat stripe pattern style", loaded.word_map,
             "the subject LoRA + <obj> tokens merged with the style LoRA").save(rg_merge)

    def files(res: Any) -> dict[str, Any]:
        return {"lora": str(res.lora), "embeddings": str(res.embeddings) if res.embeddings else None,
                "log": str(res.log), "checkpoints": [str(p) for p in res.checkpoints],
                "final_loss": res.history[-1].get("loss")}

    return {
        "subject": files(runs["subject"]),
        "style": files(runs["style"]),
        "loss_curves": str(loss_png),
        "rg_subject": str(rg_subject),
        "rg_subject_style": str(rg_merge),
        "seconds": round(time.perf_counter() - t0, 1),
        "note": "tiny random-weight model: this proves the machinery, not image quality",
    }
