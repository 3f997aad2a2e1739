"""Checks the command line runs on its arguments before loading any model (which takes seconds to
minutes): a mistake in a path is reported at once, in a sentence that names the flag."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from .errors import DCOError


def _did_you_mean(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return ""
    close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir()], n=1)
    return f" Did you mean {parent / close[0]}?" if close else ""


def check_model_source(name: str, flag: str = "--pretrained_model_name_or_path") -> None:
    """A local SDXL (diffusers folder or .safetensors file) that exists, or something shaped like a hub id.

    A relative path whose first folder exists locally (`models/sdxll`) is a typo, not a hub id."""
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise DCOError(f"{flag} {name} is not a diffusers SDXL folder (it has no unet/ subfolder); "
                           "give a diffusers SDXL folder or a single-file SDXL .safetensors.")
        return
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise DCOError(f"{flag} {name}: only .safetensors single files are loaded (no pickled .ckpt or .bin).")
        return
    parts = name.split("/")
    hub_like = (len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))
                and not Path(parts[0]).exists() and "\\" not in name)
    if not hub_like:
        raise DCOError(f"{flag} {name} does not exist (no such local folder or file, and it is not a hub id "
                       f"such as stabilityai/stable-diffusion-xl-base-1.0).{_did_you_mean(path)}")


def check_file(path: str | None, flag: str, suffix: str = ".safetensors") -> None:
    """An input file given on the command line exists and has the expected type."""
    if path is None:
        return
    p = Path(path)
    if not p.is_file():
        raise DCOError(f"{flag} {path} does not exist; give the path of a {suffix} file.{_did_you_mean(p)}")
    if p.suffix.lower() != suffix:
        raise DCOError(f"{flag} {path} is not a {suffix} file; give the {suffix} file the trainer wrote.")
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:  # reads only the header: a damaged or foreign file is named before the model loads
            with safe_open(str(p), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise DCOError(f"{flag} {path} is not a valid safetensors file ({type(exc).__name__}); give the "
                           "file the trainer wrote, or write it again if it was cut short.") from None
