"""A tiny SDXL-shaped model with random weights, built in code (no download).

It has SDXL's structure at toy sizes: two CLIP text encoders (hidden 32 + 96 = cross-attention
width 128, three layers each since SDXL reads the penultimate one; CLIP-G projects 96 -> 64), a
`text_time` UNet whose added conditioning is CLIP-G's projection plus 6 time ids x 256, a 4-level KL VAE (x8), SDXL's noise
schedule, and CLIP BPE tokenizers whose vocab and merges files are written here. The demo trains
on it and the tests use it; the layout also matches the tiny ComfyUI SDXL the node tests build.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .models import SDXL_SCHEDULER, SDXLComponents
from .text import fix_eos_pooling

# Distinct widths and a non-square CLIP-G projection, so that a swapped L/G row, a transposed
# projection or a pooled output taken before the projection fails a shape check instead of passing.
HIDDEN_L = 32
HIDDEN_G = 96
PROJECTION_G = 64
TIME_EMBED_DIM = 256  # SDXL (and ComfyUI) embed each time id with 256 sinusoidal features
WORDS = (
    "a an the of in on at with and photo picture painting drawing sketch style flat cartoon "
    "illustration dog cat person man woman house tree car bird flower beach street city forest "
    "mountain snow water sky red blue green yellow black white orange purple pink brown "
    "star circle square triangle stripe stripes pattern shape toy object obj playing sitting "
    "standing on top front side close up view macro low angle background wall ledge lush "
    "trees blossom saxophone sticker working laptop vase bowl cup chair table landscape "
    "portrait oil watercolor colorful bright dark small big tiny old new wooden metal glass"
).split()

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1),
    attention_head_dim=(1, 1),  # heads per level: width-64 heads, as SDXL (the 32-wide level has no attention)
    cross_attention_dim=HIDDEN_L + HIDDEN_G,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=PROJECTION_G + 6 * TIME_EMBED_DIM,
    norm_num_groups=32,
)

VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.13025,
)



def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable-character table (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Plain BPE: merge the adjacent pair of lowest rank until none is left."""
    ranks = {pair: i for i, pair in enumerate(merges)}
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def write_tokenizer_files(folder: str | os.PathLike, words: tuple[str, ...] | list[str] = WORDS) -> Path:
    """Write a CLIP BPE `vocab.json` + `merges.txt` in which every word of `words` is one token."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    seen = set(vocab_list)
    pending = list(dict.fromkeys(words))
    while pending:  # add glue merges until plain BPE turns every word into one symbol
        still = []
        for word in pending:
            symbols = _bpe(list(word[:-1]) + [word[-1] + "</w>"], merges)
            if len(symbols) > 1:
                merges.append((symbols[0], symbols[1]))
                if symbols[0] + symbols[1] not in seen:
                    seen.add(symbols[0] + symbols[1])
                    vocab_list.append(symbols[0] + symbols[1])
                still.append(word)
        pending = still
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def build_tokenizer(folder: str | os.PathLike, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not (folder / "vocab.json").is_file():
        write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token, model_max_length=77)


def text_encoder_config(vocab_size: int, eos_token_id: int, hidden: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=3,
        num_attention_heads=max(1, hidden // 64),  # as sgm.clip_from_hf derives it from a file
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=eos_token_id - 1,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def build_tiny_sdxl(seed: int = 0, tokenizer_dir: str | os.PathLike | None = None) -> SDXLComponents:
    """Random-weight tiny SDXL components; the same seed gives the same weights."""
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok_dir = Path(tokenizer_dir) if tokenizer_dir else Path(tempfile.mkdtemp(prefix="dco-tiny-tok-"))
    write_tokenizer_files(tok_dir)
    tokenizer = build_tokenizer(tok_dir)
    tokenizer_2 = build_tokenizer(tok_dir, pad_token="!")
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_encoder_config(vocab, eos, HIDDEN_L, "quick_gelu"))
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(vocab, eos, HIDDEN_G, "gelu", PROJECTION_G))
        torch.manual_seed(seed + 2)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        torch.manual_seed(seed + 3)
        vae = AutoencoderKL(**VAE_CONFIG)
    finally:
        torch.random.set_rng_state(gen_state)
    # diffusers zero-initialises some output layers; random weights there make the toy model
    # respond to its inputs the way a trained one does (and make LoRA effects visible).
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 4)
        for name, p in unet.named_parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    for m in (unet, vae, text_encoder, text_encoder_2):
        m.eval()
    for tok, enc in ((tokenizer, text_encoder), (tokenizer_2, text_encoder_2)):
        fix_eos_pooling(enc, tok)
    return SDXLComponents(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler)
