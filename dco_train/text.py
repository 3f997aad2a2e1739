"""SDXL prompt encoding with both CLIP encoders, pooled at the end-of-text token.

SDXL conditions on the penultimate hidden layer of CLIP-L and CLIP-G concatenated
(77 x 2048 for the real model) plus CLIG-G's projected pooled output. The pooled output is taken
explicitly at the first end-of-text position, the way ComfyUI does at inference. transformers'
legacy pooling (`eos_token_id == 2` in the stock SDXL configs) takes the argmax of the token ids
instead, which lands on an added `<token>` (DESIGN 2.6); `fix_eos_pooling` also repairs the
config so diffusers' own pipelines agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch


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


def tokenize(tokenizer: Any, prompts: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
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


#: What a new token looks like in a prompt (`<dog>`): used to notice tokens no embeddings were loaded for.
TOKEN_LIKE = re.compile(r"<[^<>\s()]+>")


def token_pattern(tokens: Sequence[str]) -> "re.Pattern[str]":
    """Matches any of `tokens`, longest first; a token that begins or ends with a letter or digit
    (`sks`) only matches as a whole word, so `asks` is left alone. The ComfyUI token loader and the
    page's prompt helper use the same rule."""
    parts = []
    for token in sorted(tokens, key=len, reverse=True):
        left = r"(?<!\w)" if re.match(r"\w", token[0]) else ""
        right = r"(?!\w)" if re.match(r"\w", token[-1]) else ""
        parts.append(left + re.escape(token) + right)
    return re.compile("|".join(parts))


def contains_token(prompt: str, tokens: Sequence[str]) -> bool:
    return bool(tokens) and token_pattern(tokens).search(prompt) is not None


def replace_tokens(prompt: str, word_map: dict[str, str]) -> str:
    """The base prompt: each new token replaced by its word, spaces tidied."""
    out = token_pattern(list(word_map)).sub(lambda m: word_map[m.group(0)], prompt) if word_map else prompt
    return " ".join(out.split())
