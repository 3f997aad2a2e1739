"""SDXL prompt encoding with both CLIP encoders, pooled at the end-of-text token.

SDXL conditions on the penultimate hidden layer of CLIP-L and CLIP-G concatenated
(77 x 2048 for the real model) plus CLIG-G's projected pooled output. The pooled output is taken
explicitly at the first end-of-text position, the way ComfyUI does at inference. transformers'
legacy pooling (`eos_token_id == 2` in the stock SDXL configs) takes the argmax of the token ids
instead, which lands on an added `<token>` (DESIGN 2.6); `fix_eos_pooling` also repairs the
config so diffusers' own pipelines agree.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import DCOError

log = logging.getLogger(__name__)

TOKEN_LIKE = re.compile(r"<[^<>\s()]+>")
"""What looks like a new token in a prompt (`<dog>`): used to name tokens that no embeddings define."""

_LONG_WARNED: set[str] = set()


@dataclass
class PromptEmbeds:
    """`embeds` [B, 77, L+G] and `pooled` [B, G_proj], the two things an SDXL UNet reads."""

    embeds: torch.Tensor
    pooled: torch.Tensor

    def __getitem__(self, idx: Any) -> "PromptEmbeds":
        return PromptEmbeds(self.embeds[idx], self.pooled[idx])

    def to(self, *args: Any, **kwargs: Any) -> "PromptEmbeds":
        return PromptEmbeds(self.embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    @staticmethod
    def cat(items: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(torch.cat([i.embeds for i in items]), torch.cat([i.pooled for i in items]))


def fix_eos_pooling(text_encoder: Any, tokenizer: Any) -> None:
    """Point transformers' pooling at the tokenizer's end-of-text id (not the legacy argmax)."""
    eos = tokenizer.eos_token_id
    text_encoder.config.eos_token_id = eos
    inner = getattr(text_encoder, "text_model", text_encoder)
    if hasattr(inner, "eos_token_id"):
        inner.eos_token_id = eos
    if hasattr(inner, "config"):
        inner.config.eos_token_id = eos


def warn_if_truncated(tokenizer: Any, prompts: Sequence[str]) -> list[str]:
    """Warn once per prompt, naming it, when it is longer than the tokenizer's 77 tokens: training
    keeps only the first 75 words' tokens, while ComfyUI encodes longer prompts in chunks of 75,
    so the LoRA would learn a different prompt from the one it is used with. Returns those prompts."""
    limit = tokenizer.model_max_length
    long = []
    for prompt in dict.fromkeys(prompts):
        if prompt in _LONG_WARNED:
            continue
        n = len(tokenizer(prompt, truncation=False).input_ids)
        if n > limit:
            _LONG_WARNED.add(prompt)
            long.append(prompt)
            log.warning("The prompt %r is %d tokens long; only the first %d are used (the rest is cut off), "
                        "while ComfyUI reads all of it. Shorten it to keep training and ComfyUI in step.",
                        prompt, n - 2, limit - 2)  # n and limit count the start and end tokens
    return long


def tokenize(tokenizer: Any, prompts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    warn_if_truncated(tokenizer, prompts)
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device) if device is not None else ids


def eos_positions(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Index of the first end-of-text token in each row (the position SDXL pools at)."""
    hit = ids == eos_token_id
    if not bool(hit.any(dim=-1).all()):
        raise ValueError("Every tokenized prompt must contain the end-of-text token.")
    return hit.int().argmax(dim=-1)


def encode_prompts(
    tokenizers: Sequence[Any], text_encoders: Sequence[Any], prompts: Sequence[str]
) -> PromptEmbeds:
    """Encode prompts the SDXL way; gradients flow if the encoders (or their TI rows) need them."""
    hidden: list[torch.Tensor] = []
    pooled = None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        device = next(encoder.parameters()).device
        ids = tokenize(tokenizer, prompts, device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if hasattr(encoder, "text_projection"):
            last = out.last_hidden_state
            rows = last[torch.arange(last.shape[0], device=last.device), eos_positions(ids, tokenizer.eos_token_id)]
            pooled = encoder.text_projection(rows.to(encoder.text_projection.weight.dtype))
    if pooled is None:
        raise ValueError("The second text encoder must be a CLIPTextModelWithProjection (SDXL's CLIP-G).")
    embeds = torch.cat([h.to(hidden[-1].dtype) for h in hidden], dim=-1)
    return PromptEmbeds(embeds, pooled)


def token_pattern(tokens: Sequence[str], not_after: str = "") -> "re.Pattern[str]":
    """Matches any of `tokens`, longest first; a token that begins or ends with a letter or digit
    (`sks`) only matches as a whole word, so `asks` is left alone. `not_after` skips matches right
    after that text (the ComfyUI token loader passes `embedding:`). The one token rule of the pack:
    the token loader and the page's prompt helper follow it too."""
    parts = []
    for token in sorted(tokens, key=len, reverse=True):
        left = r"(?<!\w)" if re.match(r"\w", token[0]) else ""
        right = r"(?!\w)" if re.match(r"\w", token[-1]) else ""
        parts.append(left + re.escape(token) + right)
    guard = f"(?<!{re.escape(not_after)})" if not_after else ""
    return re.compile(guard + "(?:" + "|".join(parts) + ")")


def contains_token(prompt: str, tokens: Sequence[str]) -> bool:
    return bool(tokens) and token_pattern(tokens).search(prompt) is not None


def replace_tokens(prompt: str, word_map: dict[str, str], *, allow_empty: bool = False) -> str:
    """The base prompt: each new token replaced by its word, spaces tidied.

    A token of the prompt whose word is empty (a reference `learned_embeds.safetensors` records no
    words) is refused rather than dropped: "A <dog> playing saxophone" would silently become
    "A playing saxophone". `allow_empty` is for a caller whose user typed the empty word on purpose."""
    if not word_map:
        return " ".join(prompt.split())
    pattern = token_pattern(list(word_map))
    if not allow_empty:
        missing = sorted({m.group(0) for m in pattern.finditer(prompt) if not word_map[m.group(0)].strip()})
        if missing:
            raise DCOError(
                f"No word is known for {', '.join(missing)} in {prompt!r}, so the base prompt cannot be derived "
                f"(none was given, and a reference learned_embeds file records none). Give one: --tokens \"{missing[0]}=dog\" on the command line, "
                f"or the word_map field ({missing[0]}=dog) in ComfyUI."
            )
    return " ".join(pattern.sub(lambda m: word_map[m.group(0)], prompt).split())
