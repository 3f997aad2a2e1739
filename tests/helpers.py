"""Helpers shared by the engine tests (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED_DIR = Path(os.environ.get("DCO_SEED_DIR", REPO.parent / "shared" / "seed"))

def write_images(folder: Path, captions: list[str], size: tuple[int, int] = (80, 64), mode: str = "RGB") -> Path:
    """Small distinct images with same-name captions."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        im = Image.new("RGB", size, (40 * i % 255, 120, 200))
        ImageDraw.Draw(im).ellipse((8 + 4 * i, 8, size[0] // 2 + 8, size[1] - 8), fill=(230, 40, 40))
        if mode != "RGB":
            im = im.convert(mode)
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption, encoding="utf-8")
    return folder


def quick_config(**overrides):
    """A subject run small enough for a test: 64 px, a few steps, no monitors, fp32."""
    from dco_train.config import TrainConfig

    base = dict(resolution=64, max_train_steps=4, checkpointing_steps=0, drift_every=0, mixed_precision="no",
                tokens={"<obj>": "toy"}, rank=4)
    base.update(overrides)
    return TrainConfig.subject(**base)
