"""Shared fixtures: tiny SDXL components built in code, small image datasets written per test."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from helpers import write_images

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
