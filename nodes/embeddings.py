"""Learned tokens in ComfyUI: a CLIP that understands `<dog>`, and the token/base prompt pair.

How the tokens reach the encoders (research/comfyui-api.md D.4): the loader returns a clone of the
CLIP with a *copied* tokenizer (`CLIP.clone()` shares the tokenizer, so the input CLIP must never
be touched). The copy rewrites each literal token into ComfyUI's own ` embedding:<dog> ` syntax and
its `clip_l` / `clip_g` sub-tokenizers answer those names from the file's rows instead of from
disk. Everything after that is ComfyUI's embedding path, so weights like `(<dog>:1.2)`, 77-token
chunking and SDXL's end-of-text pooling behave as for any embedding, and the clone works with the
stock CLIP Text Encode, SetClipHooks and LoraLoader. The copy also carries the token -> word map
(`dco_word_map`) that DCO Prompt Pair uses to write the base prompt.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import types
from typing import Any

from comfy_api.latest import io

from ..dco_train.errors import DCOError
from ..dco_train.formats import EMBED_KEYS, TokenEmbeddings, load_embeddings
from ..dco_train.text import TOKEN_LIKE, replace_tokens, token_pattern

log = logging.getLogger(__name__)

WORD_MAP_ATTR = "dco_word_map"
ROWS_ATTR = "dco_rows"
_BAD_TOKEN_CHARS = re.compile(r"[\s,():\\]")
# ----------------------------------------------------------------------------------- token CLIP
def parse_tokens(text: str) -> list[str]:
    """`"<dog>, <cat>"` -> `["<dog>", "<cat>"]` (commas or whitespace separate tokens)."""
    return [t for t in re.split(r"[\s,]+", text or "") if t]


def check_tokens(tokens: list[str]) -> None:
    for token in tokens:
        if _BAD_TOKEN_CHARS.search(token):
            raise DCOError(
                f"The token {token!r} contains a space, comma, parenthesis, colon or backslash; "
                "a token is one word such as <dog>."
            )


def encoder_widths(clip: Any) -> dict[str, int]:
    """Width of each SDXL text encoder's token embeddings (`clip_l`, `clip_g`) that this CLIP has."""
    widths: dict[str, int] = {}
    for name in EMBED_KEYS:
        if getattr(clip.tokenizer, name, None) is None:
            continue
        encoder = getattr(clip.cond_stage_model, name, None)
        try:
            widths[name] = int(encoder.transformer.get_input_embeddings().weight.shape[-1])
        except AttributeError:
            widths[name] = int(getattr(clip.tokenizer, name).embedding_size)
    return widths


def add_tokens(clip: Any, emb: TokenEmbeddings, source: str = "the embeddings file") -> Any:
    """A clone of `clip` whose prompts understand `emb.tokens`; `clip` itself is left untouched."""
    check_tokens(emb.tokens)
    widths = encoder_widths(clip)
    if not widths:
        raise DCOError(
            "This CLIP has neither a clip_l nor a clip_g text encoder, so it cannot take SDXL token embeddings; "
            "connect the CLIP output of an SDXL checkpoint loader."
        )
    for name, width in widths.items():
        rows = emb.rows(name)
        if rows.shape[-1] != width:
            raise DCOError(
                f"{source}: its {name} rows are {rows.shape[-1]} wide but this CLIP's {name} encoder is {width} wide; "
                "the embeddings were trained for another model. Load embeddings made for this checkpoint."
            )
    new = clip.clone()
    tokenizer = copy.copy(clip.tokenizer)
    for name in widths:
        sub = copy.copy(getattr(tokenizer, name))
        rows = emb.rows(name).detach().float().cpu()
        table = dict(getattr(sub, ROWS_ATTR, {}))
        table.update({token: rows[i].clone() for i, token in enumerate(emb.tokens)})
        setattr(sub, ROWS_ATTR, table)
        if sub.embedding_directory is None:
            sub.embedding_directory = []  # ComfyUI only looks up `embedding:` names when this is set
        sub._try_get_embedding = types.MethodType(_try_get_embedding, sub)
        setattr(tokenizer, name, sub)
    word_map = dict(getattr(tokenizer, WORD_MAP_ATTR, {}))
    word_map.update(emb.word_map)
    setattr(tokenizer, WORD_MAP_ATTR, word_map)
    tokenizer.tokenize_with_weights = types.MethodType(_tokenize_with_weights, tokenizer)
    new.tokenizer = tokenizer
    return new


def _try_get_embedding(self: Any, embedding_name: str) -> tuple[Any, str]:
    """Bound onto the copied sub-tokenizer: our tokens first, then ComfyUI's file lookup."""
    words = embedding_name.split()
    table = getattr(self, ROWS_ATTR, {})
    if words and words[0] in table:
        return table[words[0]], " ".join(words[1:])
    return type(self)._try_get_embedding(self, embedding_name)


def _tokenize_with_weights(self: Any, text: str, return_word_ids: bool = False, **kwargs: Any) -> Any:
    """Bound onto the copied SDXL tokenizer: `<dog>` -> ` embedding:<dog> `, then ComfyUI's tokenizer."""
    return type(self).tokenize_with_weights(self, rewrite_tokens(text, list(getattr(self, WORD_MAP_ATTR, {}))),
                                            return_word_ids, **kwargs)


def rewrite_tokens(text: str, tokens: list[str]) -> str:
    """Put ComfyUI's embedding syntax around every literal occurrence of a token."""
    if not tokens:
        return text
    # the engine's token rule (dco_train.text), not yet inside an `embedding:` of ComfyUI's syntax
    pattern = re.compile(r"(?<!embedding:)(?:" + token_pattern(tokens).pattern + ")")
    return pattern.sub(lambda m: f" embedding:{m.group(0)} ", text)


# ----------------------------------------------------------------------------------- prompt pair
def parse_word_map(text: str) -> dict[str, str]:
    """`"<dog>=dog, <cat>=cat"` (commas or new lines between entries) -> `{"<dog>": "dog", ...}`."""
    out: dict[str, str] = {}
    for entry in re.split(r"[,\n]+", text or ""):
        entry = entry.strip()
        if not entry:
            continue
        token, sep, word = entry.partition("=")
        if not sep or not token.strip():
            raise DCOError(f"The word map entry {entry!r} is not of the form <token>=word, e.g. <dog>=dog.")
        out[token.strip()] = word.strip()
    return out


def base_prompt(text: str, known: dict[str, str], mapping: dict[str, str]) -> str:
    """`text` with every token replaced by its plain word (the mapping field wins over the file;
    an empty word there, `<sks>=`, deliberately drops the token)."""
    words = {**known, **mapping}
    unknown = sorted({t for t in TOKEN_LIKE.findall(text) if t not in known})
    if unknown:
        raise DCOError(
            f"The prompt names {', '.join(unknown)}, which the token CLIP does not know. Load its embeddings with "
            "DCO Load Token Embeddings (and use that CLIP as token_clip), or remove it from the prompt."
        )
    used = [t for t in words if t in text]
    missing = [t for t in used if t not in mapping and not words[t]]
    if missing:
        raise DCOError(
            f"No plain word is known for {', '.join(missing)} (the embeddings file does not record one); "
            f"fill the word_map field, e.g. {missing[0]}=dog."
        )
    return replace_tokens(text, {t: words[t] for t in used}, allow_empty=True)  # empty words were checked above


def encode(clip: Any, text: str) -> list:
    """What the stock CLIP Text Encode node does."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


# ----------------------------------------------------------------------------------- nodes
def _embedding_files() -> list[str]:
    import folder_paths

    return sorted(f for f in folder_paths.get_filename_list("embeddings") if f.lower().endswith(".safetensors"))


def _embedding_path(name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path("embeddings", name)
    if path is None:
        raise DCOError(f"The embeddings file {name!r} is not in ComfyUI's embeddings folder(s); put it in models/embeddings.")
    return path


class DCOLoadTokenEmbeddings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCOLoadTokenEmbeddings",
            display_name="DCO Load Token Embeddings",
            category="DCO/loaders",
            description=("Teach a CLIP the learned tokens of a DCO embeddings file (clip_l + clip_g rows), so prompts "
                         "can say 'a <dog> on a beach' or '(<dog>:1.2)'. Returns a copy; the input CLIP is not changed."),
            inputs=[
                io.Clip.Input("clip", tooltip="The SDXL CLIP to extend (from Load Checkpoint)."),
                io.Combo.Input("embeddings", options=_embedding_files(),
                               tooltip="A token-embeddings .safetensors file from ComfyUI's embeddings folder."),
                io.String.Input("tokens", default="", multiline=False,
                                tooltip=("The tokens, one per row of the file in order, e.g. <dog>. Leave empty to use "
                                         "the tokens recorded in the file; required for files that record none "
                                         "(reference learned_embeds files).")),
            ],
            outputs=[io.Clip.Output("token_clip", display_name="CLIP",
                                    tooltip="A copy of the CLIP that understands the tokens in both SDXL encoders.")],
        )

    @classmethod
    def fingerprint_inputs(cls, embeddings: str = "", tokens: str = "", **kwargs: Any) -> Any:
        try:
            stat = os.stat(_embedding_path(embeddings))
        except (DCOError, OSError):
            return f"{embeddings}|{tokens}"
        return f"{embeddings}|{tokens}|{stat.st_mtime_ns}|{stat.st_size}"

    @classmethod
    def execute(cls, clip: Any, embeddings: str, tokens: str) -> io.NodeOutput:
        path = _embedding_path(embeddings)
        try:
            emb = load_embeddings(path, parse_tokens(tokens) or None)
        except DCOError as exc:
            message = str(exc)
            raise DCOError(message if os.path.basename(path) in message else f"{embeddings}: {message}") from None
        log.info("DCO: loaded tokens %s from %s", ", ".join(emb.tokens), embeddings)
        return io.NodeOutput(add_tokens(clip, emb, source=embeddings))


class DCOPromptPair(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCOPromptPair",
            display_name="DCO Prompt Pair",
            category="DCO/conditioning",
            description=("Type the prompt once: encodes it as written with the token CLIP, and with every learned token "
                         "replaced by its plain word ('a <dog>' -> 'a dog') with the base CLIP, for reward guidance."),
            inputs=[
                io.Clip.Input("token_clip", tooltip="The CLIP from DCO Load Token Embeddings (it knows the tokens)."),
                io.Clip.Input("base_clip", tooltip="The plain CLIP of the same checkpoint."),
                io.String.Input("text", multiline=True, default="a photo of <dog> on a beach",
                                tooltip="The prompt with the learned tokens."),
                io.String.Input("word_map", default="", multiline=False, optional=True,
                                tooltip=("Plain word for each token, e.g. <dog>=dog, <cat>=cat. Empty: use the words "
                                         "recorded in the embeddings file.")),
            ],
            outputs=[
                io.Conditioning.Output("token", display_name="token",
                                       tooltip="The prompt as written (for positive_token)."),
                io.Conditioning.Output("base", display_name="base",
                                       tooltip="The prompt with plain words (for positive_base)."),
            ],
        )

    @classmethod
    def execute(cls, token_clip: Any, base_clip: Any, text: str, word_map: str = "") -> io.NodeOutput:
        known = dict(getattr(token_clip.tokenizer, WORD_MAP_ATTR, {}))
        base_text = base_prompt(text, known, parse_word_map(word_map))
        log.info("DCO: base prompt %r", base_text)
        return io.NodeOutput(encode(token_clip, text), encode(base_clip, base_text))

