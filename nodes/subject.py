"""DCO Load Subject: one LoRA pick gives everything reward guidance needs.

A LoRA file trained by this pack records its embeddings file (name and sha256), the tokens with
their plain words and the recommended cfg / rg (`dco_train.formats.subject_metadata`). From that
the node returns the base MODEL, the fine-tuned MODEL (the LoRA applied as the stock LoraLoader
does), the token CLIP (the LoRA's text-encoder part and the tokens, as DCO Load Token Embeddings
does), the base CLIP and the two scales: what LoraLoader + DCO Load Token Embeddings wired by hand
gave. An optional second LoRA (a style) goes on top for the subject + style merge.

Files without that metadata still load: reference `pytorch_lora_weights.safetensors` files are
converted in memory to kohya keys, LoRAs trained before the metadata existed keep their tokens,
and the embeddings file and the tokens can be chosen / typed in.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from comfy_api.latest import io

from ..dco_train.config import TrainConfig, parse_tokens
from ..dco_train.errors import DCOError
from ..dco_train.formats import (SubjectInfo, TokenEmbeddings, file_sha256, is_reference_lora, load_embeddings,
                                 load_safetensors, read_metadata, read_subject_metadata, reference_to_kohya)
from .embeddings import _embedding_files, _embedding_path, add_tokens

log = logging.getLogger(__name__)

NO_LORA = "none"
FROM_LORA = "(from the LoRA file)"
STRENGTH_MAX = 100.0  # the stock LoraLoader's range


# ----------------------------------------------------------------------------------- files
def _lora_files() -> list[str]:
    import folder_paths

    return sorted(f for f in folder_paths.get_filename_list("loras") if f.lower().endswith(".safetensors"))


def _lora_path(name: str, field: str = "lora_name") -> str:
    import folder_paths

    path = folder_paths.get_full_path("loras", name) if name else None
    if path is None:
        raise DCOError(f"The LoRA {name!r} ({field}) is not in ComfyUI's loras folder(s); put it in models/loras.")
    return path


def _embedding_folders() -> list[str]:
    import folder_paths

    return list(folder_paths.get_folder_paths("embeddings"))


def _embeddings_named(file_name: str) -> list[str]:
    """Paths of the embeddings files called `file_name`, in any embeddings folder or subfolder."""
    return [_embedding_path(f) for f in _embedding_files() if Path(f).name == file_name]


def find_embeddings(info: SubjectInfo, lora_name: str, lora_path: str) -> str:
    """The embeddings file a LoRA records: that file name in the embeddings folders (any
    subfolder) or next to the LoRA, whose sha256 is the recorded one."""
    candidates = _embeddings_named(info.embeddings)
    beside = Path(lora_path).with_name(info.embeddings)
    if beside.is_file() and beside != Path(lora_path) and str(beside) not in candidates:
        candidates.append(str(beside))
    if not candidates:
        raise DCOError(
            f"{lora_name} was trained with the tokens {', '.join(info.tokens) or '(none recorded)'}, whose embeddings "
            f"file {info.embeddings} is not in ComfyUI's embeddings folder(s) ({', '.join(_embedding_folders())}). "
            "Copy it there (it was written with the LoRA), or choose the file in the embeddings input."
        )
    for path in candidates:
        if info.embeddings_sha256 is None or file_sha256(path) == info.embeddings_sha256:
            return path
    raise DCOError(
        f"{info.embeddings} ({', '.join(candidates)}) is not the embeddings file {lora_name} was trained with: its "
        f"sha256 differs from the one the LoRA records ({info.embeddings_sha256[:12]}...), so it is from another "
        "training run. Put the file from the same run there, or choose a file in the embeddings input to load it anyway."
    )


def subject_embeddings(info: SubjectInfo, lora_name: str, lora_path: str, embeddings: str,
                       tokens: str) -> tuple[TokenEmbeddings, str] | None:
    """The token embeddings of the subject and their file's name: the file chosen in `embeddings`,
    or the one the LoRA records; None for a LoRA without tokens (a style). `tokens` ("<dog>=dog") renames the file's
    rows in order and sets their words."""
    typed = parse_tokens(tokens)
    if embeddings and embeddings != FROM_LORA:
        path = _embedding_path(embeddings)
    elif info.embeddings:
        path = find_embeddings(info, lora_name, lora_path)
    elif typed or info.tokens:
        what = f"records the tokens {', '.join(info.tokens)}" if info.tokens and not typed else "has tokens typed in"
        raise DCOError(
            f"{lora_name} {what} but does not name its embeddings file (it was trained before ComfyUI-DCO recorded "
            "it, or by another tool); choose the embeddings file in the embeddings input."
        )
    else:
        return None
    name = os.path.basename(path)
    try:
        emb = load_embeddings(path, list(typed) or None)
    except DCOError as exc:
        message = str(exc).replace("type them in", "type them in the tokens input")
        raise DCOError(message if name in message else f"{name}: {message}") from None
    known = {**info.word_map, **{t: w for t, w in emb.word_map.items() if w}, **{t: w for t, w in typed.items() if w}}
    emb.initializers = [known.get(t, "") for t in emb.tokens]
    return emb, name


def apply_lora(model: Any, clip: Any, path: str, strength: float) -> tuple[Any, Any]:
    """What the stock LoraLoader does with one file (strength on the model and the CLIP); a
    reference-format file (diffusers keys, which ComfyUI drops for SDXL) is converted first."""
    import comfy.sd

    if strength == 0:
        return model, clip
    tensors, _ = load_safetensors(path)
    if is_reference_lora(tensors) and not any(k.endswith(".lora_down.weight") for k in tensors):
        tensors = reference_to_kohya(tensors, os.path.basename(path))
    return comfy.sd.load_lora_for_models(model, clip, tensors, strength, strength)


# ----------------------------------------------------------------------------------- the node
_LORA_TIP = ("A DCO LoRA from the loras folder. A file trained by DCO Trainer or the command line finds its own "
             "embeddings file, tokens and recommended cfg / rg.")
_EMB_TIP = ("Leave on (from the LoRA file) to use the embeddings file the LoRA records. Choose a file for a LoRA "
            "that records none (trained before this pack recorded it, or a reference file); a chosen file is not "
            "checked against the LoRA's hash.")
_TOKENS_TIP = ("Only for files without metadata: the tokens and their plain words in the embeddings file's row "
               "order, e.g. <dog>=dog. Empty: what the files record.")


class DCOLoadSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCOLoadSubject",
            display_name="DCO Load Subject",
            category="DCO/loaders",
            description=("One pick of a trained DCO LoRA gives what reward guidance needs: the base and fine-tuned "
                         "MODEL, the token CLIP (its embeddings found from the LoRA's metadata), the base CLIP and "
                         "the recommended cfg / rg. Replaces LoraLoader + DCO Load Token Embeddings."),
            inputs=[
                io.Model.Input("model", tooltip="The base SDXL MODEL (from Load Checkpoint)."),
                io.Clip.Input("clip", tooltip="The SDXL CLIP of the same checkpoint."),
                io.Combo.Input("lora_name", options=_lora_files(), tooltip=_LORA_TIP),
                io.Float.Input("strength", default=1.0, min=-STRENGTH_MAX, max=STRENGTH_MAX, step=0.01,
                               tooltip="LoRA strength on the model and the CLIP, as the stock LoraLoader's."),
                io.Combo.Input("lora_2", options=[NO_LORA] + _lora_files(), default=NO_LORA, optional=True,
                               tooltip=("A second LoRA on top, e.g. a DCO style LoRA for the subject + style merge; "
                                        "its tokens are loaded too if it records any.")),
                io.Float.Input("strength_2", default=1.0, min=-STRENGTH_MAX, max=STRENGTH_MAX, step=0.01,
                               optional=True, tooltip="Strength of lora_2 on the model and the CLIP."),
                io.Combo.Input("embeddings", options=[FROM_LORA] + _embedding_files(), default=FROM_LORA,
                               optional=True, tooltip=_EMB_TIP),
                io.String.Input("tokens", default="", multiline=False, optional=True, tooltip=_TOKENS_TIP),
            ],
            outputs=[
                io.Model.Output("base_model", display_name="base MODEL",
                                tooltip="The input MODEL, unchanged (model of the reward-guidance guider)."),
                io.Model.Output("model_ft", display_name="fine-tuned MODEL",
                                tooltip="The MODEL with the LoRA(s) applied (model_ft of the reward-guidance guider)."),
                io.Clip.Output("token_clip", display_name="token CLIP",
                               tooltip="The CLIP with the LoRA(s) and the learned tokens (token_clip of DCO Prompt Pair)."),
                io.Clip.Output("base_clip", display_name="base CLIP",
                               tooltip="The input CLIP, unchanged (base_clip of DCO Prompt Pair)."),
                io.Float.Output("cfg", display_name="cfg",
                                tooltip="The CFG scale recommended by the LoRA file (7.5 when it records none)."),
                io.Float.Output("rg", display_name="rg",
                                tooltip="The reward-guidance scale recommended by the LoRA file (3.0 when it records none)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name: str = "", lora_2: str = NO_LORA, embeddings: str = FROM_LORA,
                           tokens: str = "", **kwargs: Any) -> Any:
        """Run again when a file changes (ComfyUI would keep the cached result for the same names)."""
        parts = [lora_name, lora_2, embeddings, tokens]
        try:
            paths = [_lora_path(lora_name)] + ([_lora_path(lora_2, "lora_2")] if lora_2 != NO_LORA else [])
            if embeddings != FROM_LORA:
                paths.append(_embedding_path(embeddings))
            for path in list(paths):
                recorded = read_subject_metadata(read_metadata(path)).embeddings if embeddings == FROM_LORA else None
                if recorded:
                    paths += _embeddings_named(recorded)
            for path in paths:
                stat = os.stat(path)
                parts.append(f"{stat.st_mtime_ns}:{stat.st_size}")
        except (DCOError, OSError):
            pass
        return "|".join(parts)

    @classmethod
    def execute(cls, model: Any, clip: Any, lora_name: str, strength: float, lora_2: str = NO_LORA,
                strength_2: float = 1.0, embeddings: str = FROM_LORA, tokens: str = "") -> io.NodeOutput:
        picks = [(lora_name, _lora_path(lora_name), strength, embeddings, tokens)]
        if lora_2 and lora_2 != NO_LORA:
            picks.append((lora_2, _lora_path(lora_2, "lora_2"), strength_2, FROM_LORA, ""))
        model_ft, lora_clip = model, clip
        found: list[tuple[TokenEmbeddings, str]] = []
        first: SubjectInfo | None = None
        for name, path, weight, emb_choice, typed in picks:
            info = read_subject_metadata(read_metadata(path), name)
            first = first or info
            emb = subject_embeddings(info, name, path, emb_choice, typed)
            if emb is not None:
                found.append(emb)
            model_ft, lora_clip = apply_lora(model_ft, lora_clip, path, weight)
        token_clip = lora_clip
        for emb, emb_name in found:
            token_clip = add_tokens(token_clip, emb, source=emb_name)
            log.info("DCO: loaded the tokens %s from %s", ", ".join(emb.tokens), emb_name)
        defaults = TrainConfig()
        cfg = first.cfg if first.cfg is not None else defaults.validation_cfg
        rg = first.rg if first.rg is not None else defaults.validation_rg
        return io.NodeOutput(model, model_ft, token_clip, clip, float(cfg), float(rg))
