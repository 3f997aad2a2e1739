"""`python -m dco_train {train,sample,demo}`; also under `accelerate launch -m dco_train train ...`.

The train flags are built from `TrainConfig`'s fields (their help text and the reference script's
flag names), so the reference README's commands work unchanged apart from the program name.
Only flags given on the command line override the chosen `--preset`. The last line printed is
one JSON object with the paths of the files written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import TrainConfig, parse_tokens
from .errors import DCOError

log = logging.getLogger("dco_train")


def _config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training settings (defaults come from --preset)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        names = [f"--{f.name}", *f.metadata.get("flags", ())]
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help")}
        ann = str(f.type)
        if ann == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif ann.startswith("list"):
            kw["action"] = "append"
        elif ann.startswith("dict"):
            kw["type"] = parse_tokens
        else:
            base = ann.split("|")[0].strip()
            kw["type"] = {"int": int, "float": float, "str": str}[base]
        group.add_argument(*names, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dco_train", description="DCO fine-tuning for SDXL.")
    sub = parser.add_subparsers(dest="command", required=True)

    tr = sub.add_parser("train", help="Train a DCO LoRA (and tokens) on an SDXL.")
    tr.add_argument("--pretrained_model_name_or_path", required=True,
                    help="A diffusers SDXL folder, a single-file SDXL .safetensors, or a hub id (downloads).")
    tr.add_argument("--output_dir", default="./output", help="Where the LoRA, embeddings, log and checkpoints go.")
    tr.add_argument("--preset", choices=("subject", "style", "custom"), default="custom",
                    help="Recipe for the defaults (DESIGN 2.5); custom = the reference script's defaults.")
    tr.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint-<step> folder.")
    tr.add_argument("--output_name", help="File names <name>.safetensors and <name>_embeddings.safetensors "
                    "(default lora.safetensors and embeddings.safetensors).")
    tr.add_argument("--save_precision", choices=("fp16", "bf16", "fp32"), default="fp16")
    tr.add_argument("--tokenizer_dir", help="CLIP vocab.json/merges.txt for single-file checkpoints.")
    tr.add_argument("--report_to", choices=("auto", "tensorboard", "none"), default="auto")
    tr.add_argument("--cpu", action="store_true", help="Train on the CPU even if a GPU is present.")
    tr.add_argument("--no_progress", action="store_true", help="No progress bar.")
    _config_flags(tr)

    sa = sub.add_parser("sample", help="Sample with reward guidance.")
    from .sample_cli import add_sample_flags

    add_sample_flags(sa)

    de = sub.add_parser("demo", help="Train a tiny random SDXL on synthetic data (no download, no GPU).")
    de.add_argument("--output", default="demo_out", help="Folder for everything the demo writes.")
    de.add_argument("--steps", type=int, default=40, help="Training steps for each of the two runs.")

    from .convert import add_convert_flags  # convert block (data helper)

    add_convert_flags(sub.add_parser("convert", help="Rewrite a reference (diffusers-format) LoRA as a kohya-format "
                                     "LoRA that ComfyUI loads."))
    return parser


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    from .models import load_sdxl
    from .train import Callbacks, RunOptions, train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    cfg = TrainConfig.preset_named(args.preset, **overrides)
    out = Path(args.output_dir)
    stop = {"requested": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        log.warning("Stopping after this step and saving a checkpoint (Ctrl-C again to abort at once).")

    signal.signal(signal.SIGINT, on_sigint)
    run = RunOptions(
        output_dir=out, resume=args.resume_from_checkpoint,
        lora_path=out / f"{args.output_name}.safetensors" if args.output_name else None,
        embeddings_path=out / f"{args.output_name}_embeddings.safetensors" if args.output_name else None,
        save_precision=args.save_precision, log_with=None if args.report_to == "none" else args.report_to,
        progress_bar=not args.no_progress, cpu=args.cpu, callbacks=Callbacks(should_stop=lambda: stop["requested"]),
    )
    comps = load_sdxl(args.pretrained_model_name_or_path, tokenizer_dir=args.tokenizer_dir)
    result = train(cfg, comps, run)
    return {
        "lora": str(result.lora) if result.lora else None,
        "embeddings": str(result.embeddings) if result.embeddings else None,
        "log": str(result.log),
        "checkpoints": [str(p) for p in result.checkpoints],
        "step": result.step,
        "stopped": result.stopped,
    }


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("transformers", "diffusers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:  # the libraries' own "Loading weights" bars would bury ours
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
    except ImportError:
        pass
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            summary = run_train(args)
        elif args.command == "sample":
            from .sample_cli import run_sample

            summary = run_sample(args)
        elif args.command == "convert":  # convert block (data helper)
            from .convert import run_convert

            summary = run_convert(args)
        else:
            from .demo import run_demo

            summary = run_demo(Path(args.output), steps=args.steps)
    except DCOError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from accelerate.state import PartialState

    if PartialState().is_main_process:
        print(json.dumps(summary), flush=True)
    return 0
