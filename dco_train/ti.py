"""Textual-inversion tokens for both SDXL text encoders (DESIGN 2.2).

Each new token gets one fp32 `nn.Parameter` row per encoder. The embedding table is never
resized or written: a pre-hook on the token-embedding layer maps the new ids to a harmless id and
a forward hook splices the fp32 rows into its output (as peft's trainable_tokens does with
`index_copy`). So the rows train in fp32 whatever dtype the encoder runs in (the reference's
fp16 fault), every other row is untouched by construction, and the shared weights of a ComfyUI
CLIP are never copied or modified. After each optimizer step `renormalize_` rescales each row to
the norm it started with.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from .errors import DCOError
from .formats import TokenEmbeddings

log = logging.getLogger(__name__)


class TokenRows(nn.Module):
    """The trainable rows of the new tokens in one text encoder, spliced in by hooks."""

    def __init__(self, embedding: nn.Embedding, token_ids: Sequence[int], init_rows: torch.Tensor):
        super().__init__()
        # a weak reference: not registered as a submodule, and no cycle through the hooks the
        # table holds on these rows (the table is freed with its encoder, not at the next gc)
        self.embedding = weakref.ref(embedding)
        self.register_buffer("ids", torch.tensor(list(token_ids), dtype=torch.long), persistent=False)
        self.rows = nn.Parameter(init_rows.detach().float().clone())
        self.register_buffer("init_norm", self.rows.detach().norm(dim=-1), persistent=False)
        self._handles: list[Any] = []
        self._mask: torch.Tensor | None = None

    # ---- hooks
    def attach(self) -> "TokenRows":
        if not self._handles:
            emb = self.embedding()
            self._handles = [emb.register_forward_pre_hook(self._pre), emb.register_forward_hook(self._post)]
        return self

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        ids = args[0]
        ids_dev = self.ids.to(ids.device)
        hit = ids[..., None] == ids_dev
        self._mask = hit
        if not bool(hit.any()):
            return args
        safe = torch.where(hit.any(-1), torch.zeros_like(ids), ids)
        return (safe,) + tuple(args[1:])

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        hit, self._mask = self._mask, None
        if hit is None or not bool(hit.any()):
            return output
        which = hit.float().argmax(-1)  # index into rows, valid where any hit
        rows = self.rows.to(device=output.device)[which].to(output.dtype)
        return torch.where(hit.any(-1, keepdim=True), rows, output)

    # ---- maintenance
    @torch.no_grad()
    def renormalize_(self) -> None:
        norm = self.rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.rows.mul_(self.init_norm.to(self.rows.device)[:, None] / norm)


@dataclass
class TokenSet:
    """The new tokens of one run: their ids in each tokenizer and their rows in each encoder."""

    tokens: list[str]
    initializers: list[str]
    rows: list[TokenRows] = field(default_factory=list)

    @property
    def word_map(self) -> dict[str, str]:
        return dict(zip(self.tokens, self.initializers))

    def parameters(self) -> list[nn.Parameter]:
        return [r.rows for r in self.rows]

    def attach(self) -> "TokenSet":
        for r in self.rows:
            r.attach()
        return self

    def detach_hooks(self) -> None:
        for r in self.rows:
            r.detach_hooks()

    def renormalize_(self) -> None:
        for r in self.rows:
            r.renormalize_()

    def to_embeddings(self) -> TokenEmbeddings:
        l_rows, g_rows = (r.rows.detach().float().cpu().clone() for r in self.rows)
        return TokenEmbeddings(tokens=list(self.tokens), clip_l=l_rows, clip_g=g_rows, initializers=list(self.initializers))

    def load_rows_(self, emb: TokenEmbeddings) -> None:
        with torch.no_grad():
            for r, key in zip(self.rows, ("clip_l", "clip_g")):
                r.rows.copy_(emb.rows(key).to(r.rows))


def is_known_word(tokenizer: Any, token: str) -> bool:
    """Whether `token` already means something to the tokenizer: an entry of its vocabulary as it
    is, as CLIP's word-final form (`dog</w>`, how a whole word is stored), or text that already
    tokenizes to a single id (CLIP lower-cases, so `Dog` is `dog</w>`)."""
    vocab = tokenizer.get_vocab()
    if token in vocab or token + "</w>" in vocab:
        return True
    return len(tokenizer(token, add_special_tokens=False).input_ids) == 1


def _initial_row(tokenizer: Any, table: torch.Tensor, word: str, token: str, generator: torch.Generator) -> torch.Tensor:
    if not word:
        std = table.float().std()
        return torch.randn(table.shape[1], generator=generator) * std
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise DCOError(f"The initializer word {word!r} of {token} gives no tokens; choose a plain word such as dog.")
    if len(ids) > 1:
        log.warning("The initializer %r of %s is %d tokens; its row starts as their mean.", word, token, len(ids))
    return table[torch.tensor(ids)].float().mean(0).cpu()


def add_tokens(
    tokenizers: Sequence[Any], text_encoders: Sequence[Any], word_map: dict[str, str], seed: int = 0
) -> TokenSet:
    """Add `word_map`'s tokens to both tokenizers and create their fp32 rows (hooks not attached)."""
    from transformers import AddedToken

    tokens, words = list(word_map), [word_map[t] for t in word_map]
    if not tokens:
        raise DCOError("Textual inversion needs at least one new token such as <dog>.")
    for tokenizer in tokenizers:
        for token in tokens:
            if is_known_word(tokenizer, token):
                raise DCOError(
                    f"The token {token} is already in the tokenizer's vocabulary, so it cannot be learned as a "
                    f"new token (and the base prompt would equal the token prompt); choose a new string such as "
                    f"<{token.strip('<>')}>."
                )
    token_set = TokenSet(tokens=tokens, initializers=words)
    generator = torch.Generator().manual_seed(seed)
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        emb: nn.Embedding = encoder.get_input_embeddings()
        table = emb.weight.detach()
        init = torch.stack([_initial_row(tokenizer, table, w, t, generator) for t, w in zip(tokens, words)])
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t in tokens])
        ids = tokenizer.convert_tokens_to_ids(tokens)
        for token in tokens:
            if len(tokenizer(token, add_special_tokens=False).input_ids) != 1:
                raise DCOError(f"The tokenizer does not keep {token} as one token; use a token such as <dog>.")
        token_set.rows.append(TokenRows(emb, ids, init.to(device=table.device)))
    return token_set


def install_embeddings(tokenizers: Sequence[Any], text_encoders: Sequence[Any], emb: TokenEmbeddings) -> TokenSet:
    """Make a trained embeddings file usable in prompts (the sampler's path): add and attach."""
    for encoder, key in zip(text_encoders, ("clip_l", "clip_g")):
        width = encoder.get_input_embeddings().weight.shape[1]
        if emb.rows(key).shape[1] != width:
            raise DCOError(
                f"The {key} rows are {emb.rows(key).shape[1]} wide but this text encoder's embeddings are "
                f"{width} wide; the embeddings were trained for another model."
            )
    token_set = add_tokens(tokenizers, text_encoders, dict(zip(emb.tokens, emb.initializers)))
    token_set.load_rows_(emb)
    for r in token_set.rows:
        r.rows.requires_grad_(False)
    return token_set.attach()
