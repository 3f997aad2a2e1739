"""`python -m dco_train sample` (reward-guidance images from an SDXL plus DCO LoRA(s) and tokens) and
`python -m dco_train tiny-model` (the demo's tiny random SDXL, to try `train` and `sample` anywhere)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .errors import DCOError

log = logging.getLogger("dco_train")


def helptext(text: str, default: Any = None) -> str:
    """A help string argparse can format (a literal % is escaped) with its default spelled out."""
    text = text if default is None else f"{text.rstrip()} (default: {default})"
    return text.replace("%", "%%")


def _lora_arg(text: str) -> tuple[str, float]:
    path, sep, weight = text.rpartition(":")
    if sep and path and not weight.startswith(("/", "\\")):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def add_sample_flags(p: argparse.ArgumentParser) -> None:
    from .schedulers import SCHEDULERS

    p.add_argument(
        "--pretrained_model_name_or_path", required=True, help="The base SDXL (folder, single file or hub id)."
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        type=_lora_arg,
        metavar="FILE[:WEIGHT]",
        help="A LoRA file (or a train output folder) and its weight, 1 when left out; repeat to merge "
        "a subject and a style LoRA (default: none).",
    )
    p.add_argument(
        "--embeddings", help="A token-embeddings file (clip_l/clip_g) or a train output folder (default: none)."
    )
    p.add_argument(
        "--tokens",
        help='Tokens of a reference learned_embeds file without metadata, e.g. "<dog>" '
        "(comma-separated; default: the file's own).",
    )
    p.add_argument("--prompt", required=True, help='The prompt with the new tokens, e.g. "a <dog> playing saxophone".')
    p.add_argument(
        "--base_prompt", help="The prompt without tokens (default: the prompt with each token replaced by its word)."
    )
    p.add_argument(
        "--negative_prompt",
        default=None,
        help="The negative prompt (default: none, which uses all-zero "
        'embeddings as diffusers\' SDXL pipelines do; --negative_prompt "" encodes the empty prompt).',
    )
    p.add_argument("--cfg", type=float, default=7.5, help=helptext("CFG scale.", 7.5))
    p.add_argument(
        "--rg",
        type=float,
        default=3.0,
        help=helptext("Reward-guidance scale; 0 is plain CFG with the fine-tuned model.", 3.0),
    )
    p.add_argument("--rg_start", type=float, default=0.0,
                   help=helptext("Reward guidance from this fraction of the schedule (0 = the first step).", 0.0))
    p.add_argument("--rg_end", type=float, default=1.0,
                   help=helptext("Reward guidance up to this fraction of the schedule (1 = the last step); "
                                 "steps outside the window skip the token pass.", 1.0))
    p.add_argument("--outside_window", choices=("ft", "base"), default="ft",
                   help=helptext("Plain CFG outside the window: ft (the fine-tuned model on the prompt) or base "
                                 "(the base model on the base prompt).", "ft"))
    p.add_argument("--steps", type=int, default=30, help=helptext("Sampling steps.", 30))
    p.add_argument(
        "--scheduler",
        default="euler",
        help=helptext(f"{', '.join(SCHEDULERS)}, or a diffusers scheduler class name.", "euler"),
    )
    p.add_argument("--seed", type=int, default=42, help=helptext("Seed of the starting noise.", 42))
    p.add_argument("--width", type=int, default=1024, help=helptext("Image width in pixels (a multiple of 8).", 1024))
    p.add_argument("--height", type=int, default=1024, help=helptext("Image height in pixels (a multiple of 8).", 1024))
    p.add_argument("--num_images", type=int, default=1, help=helptext("Images sampled together.", 1))
    p.add_argument("--output_dir", default="samples", help=helptext("Folder for the PNGs (created).", "samples"))
    p.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default=None,
        help="UNet/text-encoder precision (default: fp16 on a GPU, fp32 on the CPU).",
    )
    p.add_argument("--cpu", action="store_true", help="Sample on the CPU even if a GPU is present.")
    p.add_argument("--no_progress", action="store_true", help="No progress bar.")
    p.add_argument(
        "--tokenizer_dir",
        help="CLIP vocab.json/merges.txt for single-file checkpoints (default: "
        "ComfyUI's comfy/sd1_tokenizer or the hub cache, when found).",
    )


def _in_folder(path: str, names: tuple[str, ...]) -> str:
    """A train output folder given where a file is expected: the file the trainer writes there."""
    p = Path(path)
    if not p.is_dir():
        return path
    for name in names:
        if (p / name).is_file():
            return str(p / name)
    raise DCOError(f"The folder {p} holds none of {', '.join(names)}; give the file itself.")


def _check_sample_args(args: argparse.Namespace):
    """Everything that can be checked before the model loads; returns the settings and the adapters."""
    from .outputs import DIFFUSERS_LORA_NAME, EMBEDDINGS_NAME, ensure_writable_folder
    from .preflight import check_file, check_model_source
    from .sample import SampleSettings, check_scheduler_name
    from .text import TOKEN_LIKE

    settings = SampleSettings(
        prompt=args.prompt,
        base_prompt=args.base_prompt,
        negative_prompt=args.negative_prompt,
        cfg=args.cfg,
        rg=args.rg,
        steps=args.steps,
        scheduler=args.scheduler,
        seed=args.seed,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        rg_start=args.rg_start,
        rg_end=args.rg_end,
        outside=args.outside_window,
    )
    check_scheduler_name(args.scheduler)
    check_model_source(args.pretrained_model_name_or_path)
    loras = [(_in_folder(path, (DIFFUSERS_LORA_NAME, "lora.safetensors")), w) for path, w in args.lora]
    for path, _ in loras:
        check_file(path, "--lora")
    embeddings = _in_folder(args.embeddings, (EMBEDDINGS_NAME,)) if args.embeddings else None
    check_file(embeddings, "--embeddings")
    found = TOKEN_LIKE.findall(args.prompt)
    if found and embeddings is None:
        raise DCOError(
            f"The prompt names {', '.join(found)} but no token embeddings are loaded, so the model would "
            "read the characters; add --embeddings with the embeddings file of the training run."
        )
    ensure_writable_folder(Path(args.output_dir))
    return settings, loras, embeddings


def run_sample(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .models import load_sdxl
    from .sample import load_adapters, rg_sample
    from .text import replace_tokens

    settings, loras, embeddings = _check_sample_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    ]
    comps = load_sdxl(args.pretrained_model_name_or_path, tokenizer_dir=args.tokenizer_dir)
    for m in (comps.unet, comps.text_encoder, comps.text_encoder_2):
        m.to(device, dtype)
    comps.vae.to(device, torch.float32)
    tokens = [t.strip() for t in args.tokens.split(",")] if args.tokens else None
    loaded = load_adapters(comps, loras, embeddings, tokens)
    if loaded.token_set is not None and not any(t in settings.prompt for t in loaded.word_map):
        log.warning("The prompt names none of the loaded tokens (%s).", ", ".join(loaded.word_map))
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else None
    kwargs = {"autocast": autocast} if autocast else {}
    images = rg_sample(comps, settings, loaded.word_map, progress_bar=not args.no_progress, **kwargs)
    out = Path(args.output_dir)
    paths = []
    for i, image in enumerate(images):
        path = out / f"rg{settings.rg:g}_seed{settings.seed}_{i}.png"
        image.save(path)
        paths.append(str(path))
    log.info("Wrote %d image%s: %s", len(paths), "" if len(paths) == 1 else "s", ", ".join(paths))
    base = (
        settings.base_prompt if settings.base_prompt is not None else replace_tokens(settings.prompt, loaded.word_map)
    )
    return {"images": paths, "prompt": settings.prompt, "base_prompt": base, "cfg": settings.cfg, "rg": settings.rg}


def add_tiny_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="Folder to write the tiny model into (created; must be empty).")
    p.add_argument(
        "--single-file",
        dest="single_file",
        action="store_true",
        help="Write one SGM-layout tiny_sdxl.safetensors (as ComfyUI stores checkpoints) plus a tokenizer/ "
        "folder for --tokenizer_dir, instead of a diffusers folder.",
    )
    p.add_argument("--seed", type=int, default=0, help=helptext("Seed of the random weights.", 0))


def run_tiny_model(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's random-weight SDXL-shaped model on disk: `train` and `sample` run on it in seconds."""
    from .models import save_single_file
    from .outputs import ensure_writable_folder
    from .tiny import build_tiny_sdxl

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DCOError(f"--output {out} already exists and is not an empty folder; choose a new folder.")
    ensure_writable_folder(out, "--output")
    tok_dir = out / "tokenizer"  # a diffusers folder carries its own tokenizer/ and tokenizer_2/
    comps = build_tiny_sdxl(seed=args.seed, tokenizer_dir=tok_dir if args.single_file else None)
    if args.single_file:
        path = save_single_file(comps, out / "tiny_sdxl.safetensors")
        log.info(
            "Wrote %s; train on it with --pretrained_model_name_or_path=%s --tokenizer_dir=%s", path, path, tok_dir
        )
        return {"model": str(path), "tokenizer_dir": str(tok_dir)}
    comps.save_pretrained(out)
    log.info("Wrote the diffusers folder %s; train on it with --pretrained_model_name_or_path=%s", out, out)
    return {"model": str(out), "tokenizer_dir": None}
