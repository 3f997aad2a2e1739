"""`python -m dco_train sample`: reward-guidance images from an SDXL plus DCO LoRA(s) and tokens."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def _lora_arg(text: str) -> tuple[str, float]:
    path, sep, weight = text.rpartition(":")
    if sep and path and not weight.startswith(("/", "\\")):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def add_sample_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pretrained_model_name_or_path", required=True, help="The base SDXL (folder, single file or hub id).")
    p.add_argument("--lora", action="append", default=[], type=_lora_arg, metavar="FILE[:WEIGHT]",
                   help="A LoRA file and its weight; repeat to merge a subject and a style LoRA.")
    p.add_argument("--embeddings", help="A token-embeddings file (clip_l/clip_g).")
    p.add_argument("--tokens", help="Tokens of a reference learned_embeds file without metadata, e.g. '<dog>'.")
    p.add_argument("--prompt", required=True, help="The prompt with the new tokens, e.g. 'a <dog> playing saxophone'.")
    p.add_argument("--base_prompt", help="The prompt without tokens; derived from the tokens' words when omitted.")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale.")
    p.add_argument("--rg", type=float, default=3.0, help="Reward-guidance scale; 0 is plain CFG with the fine-tuned model.")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--scheduler", default="euler", help="euler, euler_a, dpmpp_2m, dpmpp_2m_karras, ddim, unipc, heun, ...")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--num_images", type=int, default=1)
    p.add_argument("--output_dir", default="samples")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="UNet/text-encoder precision (default: fp16 on a GPU, fp32 on the CPU).")
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--tokenizer_dir", help="CLIP vocab.json/merges.txt for single-file checkpoints.")


def run_sample(args: argparse.Namespace) -> dict[str, Any]:
    from .models import load_sdxl
    from .sample import SampleSettings, load_adapters, rg_sample

    settings = SampleSettings(
        prompt=args.prompt, base_prompt=args.base_prompt, negative_prompt=args.negative_prompt, cfg=args.cfg,
        rg=args.rg, steps=args.steps, scheduler=args.scheduler, seed=args.seed, width=args.width,
        height=args.height, num_images=args.num_images,
    )
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    comps = load_sdxl(args.pretrained_model_name_or_path, tokenizer_dir=args.tokenizer_dir)
    for m in (comps.unet, comps.text_encoder, comps.text_encoder_2):
        m.to(device, dtype)
    comps.vae.to(device, torch.float32)
    tokens = [t.strip() for t in args.tokens.split(",")] if args.tokens else None
    loaded = load_adapters(comps, args.lora, args.embeddings, tokens)
    if loaded.token_set is not None and not any(t in settings.prompt for t in loaded.word_map):
        log.warning("The prompt names none of the loaded tokens (%s).", ", ".join(loaded.word_map))
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else None
    kwargs = {"autocast": autocast} if autocast else {}
    images = rg_sample(comps, settings, loaded.word_map, **kwargs)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out / f"rg{settings.rg:g}_seed{settings.seed}_{i}.png"
        image.save(path)
        paths.append(str(path))
    from .text import replace_tokens

    base = settings.base_prompt if settings.base_prompt is not None else replace_tokens(settings.prompt, loaded.word_map)
    return {"images": paths, "prompt": settings.prompt, "base_prompt": base, "cfg": settings.cfg, "rg": settings.rg}
