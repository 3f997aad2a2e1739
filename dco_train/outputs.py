"""The command line's guard on its output folder: never overwrite a user's earlier run unless asked.

Pure functions on paths, so the rules are tested without a model: which files make a folder
"hold a run", whether the folder (or the parents it needs) can be written, and clearing a run
when `--overwrite` was given. The CLI calls them before any model is loaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import DCOError

#: What diffusers' `load_lora_weights(folder)` looks for; the CLI names its LoRA so.
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
EMBEDDINGS_NAME = "embeddings.safetensors"
PER_IMAGE_NAME = "per_image.json"  # each training image's final error, LoRA on and off
# Files and folders a finished or partial run leaves behind (the engine's default names too).
RUN_MARKERS = ("metrics.jsonl", "checkpoints", DIFFUSERS_LORA_NAME, "lora.safetensors", EMBEDDINGS_NAME,
               PER_IMAGE_NAME)


def run_files(folder: Path, extra: Iterable[Path] = ()) -> list[Path]:
    """The files of an earlier run found in `folder` (empty when there is none)."""
    candidates = [folder / name for name in RUN_MARKERS] + [Path(p) for p in extra]
    seen: list[Path] = []
    for path in candidates:
        if path.exists() and path not in seen:
            seen.append(path)
    return seen


def guard_run_folder(folder: Path, *, resume: str | None, overwrite: bool, extra: Iterable[Path] = ()) -> list[Path]:
    """Refuse a folder that holds a run unless the user resumes it or asked to overwrite it.

    Returns the files `clear_run` should delete (only with `overwrite`); nothing is deleted here,
    so the caller can validate the dataset first."""
    found = run_files(folder, extra)
    if not found or resume:
        return []
    if overwrite:
        return found
    names = ", ".join(p.name for p in found)
    raise DCOError(
        f"The output folder {folder} already holds a run ({names}). Choose another --output_dir, continue it "
        "with --resume_from_checkpoint latest, or add --overwrite to replace it."
    )


def clear_run(paths: Iterable[Path]) -> None:
    """Delete an earlier run's files (after `--overwrite` and after every argument was validated)."""
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def ensure_writable_folder(folder: Path, flag: str = "--output_dir") -> Path:
    """Create `folder` and its missing parents and prove a file can be written there.

    A read-only disk, a file in the way or missing permissions become one sentence naming the flag."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".dco-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DCOError(
            f"Cannot write to the {flag} folder {folder} ({reason}); choose a folder you can write to."
        ) from None
    return folder
