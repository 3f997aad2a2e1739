"""`python -m dco_train train`: every argument checked before the model loads, then the run.

The order matters: the settings, the dataset, the model path and the output folder are all
checked first (a mistake costs a second, not a model load), and with `--overwrite` the earlier
run is deleted only after all of them passed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .errors import DCOError
from .outputs import DIFFUSERS_LORA_NAME, EMBEDDINGS_NAME, clear_run, ensure_writable_folder, guard_run_folder
from .preflight import check_model_source

log = logging.getLogger("dco_train")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # set by accelerate launch / torchrun


def _check_resume(output_dir: Path, spec: str | None) -> None:
    from .checkpoint import resolve_resume

    if spec and resolve_resume(output_dir / "checkpoints", spec) is None:
        log.warning("--resume_from_checkpoint %s: %s holds no checkpoint yet, so training starts from step 0.",
                    spec, output_dir / "checkpoints")


def prepare_train(args: argparse.Namespace):
    """Validate everything, clear an overwritten run, load the model: `(cfg, components, run options)`."""
    from .data import load_dataset_spec
    from .train import RunOptions

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig.preset_named(args.preset, **overrides)
    load_dataset_spec(cfg)  # the images exist, the captions parse and name the tokens
    check_model_source(args.pretrained_model_name_or_path)
    if args.tokenizer_dir and not Path(args.tokenizer_dir).is_dir():
        raise DCOError(f"--tokenizer_dir {args.tokenizer_dir} is not a folder; give the folder with CLIP's "
                       "vocab.json and merges.txt.")
    out = Path(args.output_dir)
    name = args.output_name
    lora_path = out / (f"{name}.safetensors" if name else DIFFUSERS_LORA_NAME)
    emb_path = out / (f"{name}_embeddings.safetensors" if name else EMBEDDINGS_NAME)
    doomed = guard_run_folder(out, resume=args.resume_from_checkpoint, overwrite=args.overwrite,
                              extra=[lora_path, emb_path])
    _check_resume(out, args.resume_from_checkpoint)
    ensure_writable_folder(out)
    if doomed and _is_main_process():
        log.info("--overwrite: deleting the earlier run in %s (%s).", out, ", ".join(p.name for p in doomed))
        clear_run(doomed)
    run = RunOptions(
        output_dir=out, resume=args.resume_from_checkpoint, lora_path=lora_path, embeddings_path=emb_path,
        save_precision=args.save_precision, log_with=None if args.report_to == "none" else args.report_to,
        progress_bar=not args.no_progress, cpu=args.cpu,
    )
    from .models import load_sdxl

    return cfg, load_sdxl(args.pretrained_model_name_or_path, tokenizer_dir=args.tokenizer_dir), run


def train_with_sigint(cfg: TrainConfig, comps: Any, run: Any):
    """Train; the first Ctrl-C stops after the current step (with a checkpoint), a second one stops
    at once (main() turns the KeyboardInterrupt into a message)."""
    from .train import train

    stop = {"requested": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        log.warning("Stopping after this step and saving a checkpoint (Ctrl-C again to stop at once).")

    previous = signal.signal(signal.SIGINT, on_sigint)
    run.callbacks = dataclasses.replace(run.callbacks, should_stop=lambda: stop["requested"])
    try:
        return train(cfg, comps, run)
    finally:
        signal.signal(signal.SIGINT, previous)
