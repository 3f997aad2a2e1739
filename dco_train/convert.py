"""`python -m dco_train convert IN OUT`: a LoRA trained by the reference (or any diffusers/peft-format
SDXL LoRA) rewritten as a kohya-format LoRA that ComfyUI's stock LoraLoader maps completely.

The reference saves `pytorch_lora_weights.safetensors` with diffusers keys (`unet.<module>.lora.down.weight`
or peft's `lora_A`/`lora_B`) and no alpha. ComfyUI maps none of those keys for SDXL; kohya keys with
diffusers module names and an explicit `.alpha` (= rank, the scale diffusers applies) it maps all of.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import DCOError
from .formats import is_reference_lora, load_safetensors, lora_metadata, reference_to_kohya, save_safetensors

REFERENCE_LORA_NAME = "pytorch_lora_weights.safetensors"


def _input_file(src: Path) -> Path:
    """A file as it is; a reference output folder -> its `pytorch_lora_weights.safetensors`."""
    if src.is_dir():
        inner = src / REFERENCE_LORA_NAME
        if not inner.is_file():
            raise DCOError(f"The folder {src} has no {REFERENCE_LORA_NAME}; give the LoRA file itself.")
        return inner
    if not src.is_file():
        raise DCOError(f"The LoRA file {src} does not exist; check the path.")
    return src


def convert_lora(src: str | Path, dst: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Rewrite the reference-format LoRA `src` as a kohya-format LoRA at `dst`; returns a summary."""
    src, dst = _input_file(Path(src)), Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise DCOError(f"The output {dst} must end in .safetensors (for example {dst.with_suffix('.safetensors')}).")
    if dst.exists() and not overwrite:
        raise DCOError(f"{dst} already exists; choose another output name or pass --overwrite.")
    if not dst.parent.is_dir():
        raise DCOError(f"The folder {dst.parent} does not exist; create it or choose another output path.")
    tensors, metadata = load_safetensors(src)
    if any(k.endswith(".lora_down.weight") for k in tensors):
        raise DCOError(f"{src} is already a kohya-format LoRA; ComfyUI loads it as it is, nothing to convert.")
    if not is_reference_lora(tensors):
        raise DCOError(
            f"{src} holds no diffusers-format LoRA keys (unet.<module>.lora.down.weight or .lora_A.weight); "
            "it is not a LoRA saved by the reference or diffusers."
        )
    kohya = reference_to_kohya(tensors, src.name)
    meta = {**lora_metadata(kohya), "dco.converted_from": src.name}
    save_safetensors(dst, kohya, meta)
    modules = sum(1 for k in kohya if k.endswith(".alpha"))
    return {"lora": str(dst), "modules": modules, "source": str(src)}


def add_convert_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="The reference's pytorch_lora_weights.safetensors (or its output folder).")
    parser.add_argument("output", help="The kohya-format LoRA to write, e.g. ComfyUI/models/loras/my_dog.safetensors.")
    parser.add_argument("--overwrite", action="store_true", help="Replace the output file if it exists (default: refuse).")


def run_convert(args: argparse.Namespace) -> dict[str, Any]:
    return convert_lora(args.input, args.output, overwrite=args.overwrite)
