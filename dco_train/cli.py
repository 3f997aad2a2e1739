"""`python -m dco_train {train,sample,demo,tiny-model}` (or `dco-train ...` once installed); also under
`accelerate launch -m dco_train train ...`.

The train flags are built from `TrainConfig`'s fields (their help text and the reference script's
flag names), so the reference README's commands work unchanged apart from the program name.
Only flags given on the command line override the chosen `--preset`. Every argument is checked
before a model is loaded. The last line printed is one JSON object with the paths of the files written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import TrainConfig, parse_tokens
from .errors import DCOError
from .sample_cli import add_sample_flags, add_tiny_model_flags, helptext, run_sample, run_tiny_model

log = logging.getLogger("dco_train")
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value in (None, [], {}):
        return "not set"
    return str(value)


def _tokens_arg(text: str) -> dict[str, str]:
    try:
        return parse_tokens(text)
    except DCOError as exc:  # argparse would replace a ValueError's message with "invalid value"
        raise argparse.ArgumentTypeError(str(exc)) from None


def _config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training settings (--preset changes some defaults; flags you give win)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        names = [f"--{f.name}", *f.metadata.get("flags", ())]
        ann = str(f.type)
        hint = " Repeat the flag for several." if ann.startswith("list") else ""
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                              "help": helptext(f.metadata.get("help", "") + hint, _show(getattr(defaults, f.name)))}
        if ann == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif ann.startswith("list"):
            kw["action"] = "append"
        elif ann.startswith("dict"):
            kw["type"] = _tokens_arg
        else:
            kw["type"] = {"int": int, "float": float, "str": str}[ann.split("|")[0].strip()]
        group.add_argument(*names, **kw)


def _add_train_flags(tr: argparse.ArgumentParser) -> None:
    tr.add_argument("--pretrained_model_name_or_path", required=True,
                    help="A diffusers SDXL folder, a single-file SDXL .safetensors, or a hub id (downloads).")
    tr.add_argument("--output_dir", default="./output", help=helptext(
        "Where the LoRA (pytorch_lora_weights.safetensors), embeddings, metrics.jsonl and checkpoints/ go; "
        "missing parent folders are created.", "./output"))
    tr.add_argument("--overwrite", action="store_true",
                    help="Replace the run already in --output_dir (refused without it or --resume_from_checkpoint).")
    tr.add_argument("--preset", choices=("subject", "style", "custom"), default="custom", help=helptext(
        "Recipe for the defaults: subject (tokens, rank 32, 2000 steps), style (no tokens, rank 64, 1000 steps, "
        "offset noise 0.1) or custom (the reference script's defaults).", "custom"))
    tr.add_argument("--resume_from_checkpoint", metavar="latest|FOLDER",
                    help="Continue a run: 'latest' or a checkpoint-<step> folder (default: start afresh).")
    tr.add_argument("--output_name", help="Write <name>.safetensors and <name>_embeddings.safetensors instead "
                    "(default: pytorch_lora_weights.safetensors and embeddings.safetensors).")
    tr.add_argument("--save_precision", choices=("fp16", "bf16", "fp32"), default="fp16",
                    help=helptext("Precision of the saved LoRA.", "fp16"))
    tr.add_argument("--tokenizer_dir", help="CLIP vocab.json/merges.txt for single-file checkpoints (default: "
                    "ComfyUI's comfy/sd1_tokenizer or the hub cache, when found).")
    tr.add_argument("--report_to", choices=("auto", "tensorboard", "none"), default="auto",
                    help=helptext("TensorBoard logs; auto writes them when tensorboard is installed.", "auto"))
    tr.add_argument("--cpu", action="store_true", help="Train on the CPU even if a GPU is present.")
    tr.add_argument("--no_progress", action="store_true", help="No progress bar.")
    _config_flags(tr)


def build_parser() -> argparse.ArgumentParser:
    prog = "dco-train" if Path(sys.argv[0]).name.startswith("dco-train") else "python -m dco_train"
    parser = argparse.ArgumentParser(prog=prog, description="DCO fine-tuning for SDXL.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_flags(sub.add_parser("train", help="Train a DCO LoRA (and tokens) on an SDXL."))
    add_sample_flags(sub.add_parser("sample", help="Sample with reward guidance."))
    de = sub.add_parser("demo", help="Train a tiny random SDXL on synthetic data (no download, no GPU).")
    de.add_argument("--output", default="demo_out", help=helptext("Folder for everything the demo writes.", "demo_out"))
    de.add_argument("--steps", type=int, default=40, help=helptext("Training steps for each of the two runs.", 40))
    add_tiny_model_flags(sub.add_parser("tiny-model", help="Write the demo's tiny random SDXL, to try train and "
                                        "sample without SDXL weights."))
    from .convert import add_convert_flags

    add_convert_flags(sub.add_parser("convert", help="Rewrite a reference (diffusers-format) LoRA as a kohya-format "
                                     "LoRA that ComfyUI loads."))
    return parser


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    from .train_cli import prepare_train, train_with_sigint

    cfg, comps, run = prepare_train(args)
    result = train_with_sigint(cfg, comps, run)
    return {
        "lora": str(result.lora) if result.lora else None,
        "embeddings": str(result.embeddings) if result.embeddings else None,
        "log": str(result.log),
        "checkpoints": [str(p) for p in result.checkpoints],
        "step": result.step,
        "stopped": result.stopped,
    }


def _quiet_libraries() -> None:
    for noisy in ("transformers", "diffusers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:  # the libraries' own "Loading weights" bars would bury ours
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
    except ImportError:
        pass


def _dispatch(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "train":
        return run_train(args)
    if args.command == "sample":
        return run_sample(args)
    if args.command == "tiny-model":
        return run_tiny_model(args)
    if args.command == "convert":
        from .convert import run_convert

        return run_convert(args)
    from .demo import run_demo
    from .outputs import ensure_writable_folder

    if args.steps < 1:
        raise DCOError(f"--steps must be at least 1, not {args.steps}.")
    return run_demo(ensure_writable_folder(Path(args.output), "--output"), steps=args.steps)


def main(argv: Sequence[str] | None = None) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        with logging_redirect_tqdm():  # log lines go above the progress bar, not through it
            summary = _dispatch(args)
    except DCOError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("Interrupted: stopped at once. Checkpoints already saved are kept; continue with "
              "--resume_from_checkpoint latest.", file=sys.stderr)
        return EXIT_INTERRUPTED
    from accelerate.state import PartialState

    if PartialState().is_main_process:
        print(json.dumps(summary), flush=True)
    return 0
