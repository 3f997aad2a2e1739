"""Shared fixtures: tiny SDXL components built in code, small image datasets written per test."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SEED_DIR = Path(os.environ.get("DCO_SEED_DIR", REPO.parent / "shared" / "seed"))

# transformers/diffusers print a line per tiny model about its toy config; keep test logs readable
logging.getLogger("transformers").setLevel(logging.ERROR)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from dco_train.tiny import write_tokenizer_files

    return write_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def tiny(tokenizer_dir):
    """Fresh tiny SDXL components (the trainer modifies them in place)."""
    from dco_train.tiny import build_tiny_sdxl

    return build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """The tiny SDXL saved as a diffusers folder (what the command line loads)."""
    from dco_train.tiny import build_tiny_sdxl

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir).save_pretrained(folder)
    return folder


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


@pytest.fixture
def subject_dir(tmp_path) -> Path:
    return write_images(tmp_path / "subject", [
        "a photo of a <obj> on a table",
        "a close up photo of a <obj> in the snow",
        "a photo of a <obj> on the beach",
    ])


@pytest.fixture
def style_dir(tmp_path) -> Path:
    return write_images(tmp_path / "style", ["a house in flat cartoon illustration style"], size=(64, 64))


def quick_config(**overrides):
    """A subject run small enough for a test: 64 px, a few steps, no monitors, fp32."""
    from dco_train.config import TrainConfig

    base = dict(resolution=64, max_train_steps=4, checkpointing_steps=0, drift_every=0, mixed_precision="no",
                tokens={"<obj>": "toy"}, rank=4)
    base.update(overrides)
    return TrainConfig.subject(**base)
