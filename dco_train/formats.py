"""The files we write and read: kohya-format LoRA, `clip_l`/`clip_g` token embeddings.

Every file goes to a temporary name in the target folder and is renamed into place, so a crash
never leaves half a file under the real name. Only safetensors are read; nothing is unpickled.

LoRA keys (DESIGN 2.3): `lora_unet_<diffusers module path with _>.lora_down.weight`, `.lora_up.weight`
and `.alpha` for every module (text encoders: `lora_te1_` / `lora_te2_` with transformers' names).
ComfyUI's stock LoraLoader maps all of them for SDXL and diffusers' `load_lora_weights` reads them.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from .errors import DCOError

LORA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
EMBED_KEYS = ("clip_l", "clip_g")
META_TOKENS = "dco.tokens"
META_INITIALIZERS = "dco.initializers"
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ------------------------------------------------------------------------------- atomic files
def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` for a temporary file next to `path`, then rename it onto `path`."""
    path = Path(path)
    if not path.parent.is_dir():
        raise DCOError(f"The folder {path.parent} does not exist; create it or choose another output folder.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=meta))


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DCOError(f"The file {path} does not exist.")
    if path.suffix.lower() != ".safetensors":
        raise DCOError(f"{path.name} is not a .safetensors file; only safetensors are loaded (no pickle).")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise DCOError(f"Cannot read {path}: it is not a valid safetensors file ({exc}).") from exc
    return tensors, metadata


def safe_output_path(folder: str | os.PathLike, name: str, suffix: str = ".safetensors", overwrite: bool = False) -> Path:
    """`folder/name+suffix`, refusing names that leave the folder or would overwrite a file."""
    if not name or not name.strip():
        raise DCOError("The output name is empty; give a name such as my_dog.")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise DCOError(f"The output name {name!r} must be a name inside the models folder, not an absolute path.")
    parts = re.split(r"[\\/]", name)
    if any(p in ("..", ".") or not p.strip() for p in parts):
        raise DCOError(f"The output name {name!r} may not contain '..', '.' or empty folder parts.")
    if suffix and name.lower().endswith(suffix):
        name = name[: -len(suffix)]
    root = Path(folder).resolve()
    path = (root / (name + suffix)).resolve()
    if root not in path.parents:
        raise DCOError(f"The output name {name!r} would leave the folder {root}.")
    if path.exists() and not overwrite:
        raise DCOError(f"{path} already exists; choose another name or turn on overwrite.")
    return path


# ------------------------------------------------------------------------------- LoRA files
def peft_to_kohya(
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]], alphas: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Turn peft LoRA state dicts into kohya keys with diffusers module names and a real alpha.

    `state_dicts` maps "unet" / "text_encoder" / "text_encoder_2" to `get_peft_model_state_dict`
    output; `alphas` gives each component's lora_alpha. The key renaming is diffusers'
    `convert_state_dict_to_kohya`; its `.alpha` (always the rank) is replaced by the true alpha,
    and transformers-5 text-encoder names get back the `text_model.` level ComfyUI expects.
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    prefixed: dict[str, torch.Tensor] = {}
    for component, sd in state_dicts.items():
        if component not in LORA_PREFIXES:
            raise ValueError(f"Unknown LoRA component {component!r}.")
        for key, value in sd.items():
            if component != "unet" and not key.startswith("text_model."):
                key = "text_model." + key
            prefixed[f"{component}.{key}"] = value
    kohya = convert_state_dict_to_kohya(prefixed)
    for key in list(kohya):
        if key.endswith(".alpha"):
            component = next(c for c, p in LORA_PREFIXES.items() if key.startswith(p + "_"))
            kohya[key] = torch.tensor(float(alphas[component]), dtype=torch.float32)
    return kohya


@dataclass
class LoraModule:
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class LoraFile:
    """A LoRA read back from disk: `modules[component][kohya_name]`, plus the file's metadata."""

    modules: dict[str, dict[str, LoraModule]]
    metadata: dict[str, str] = field(default_factory=dict)


def save_lora(
    path: str | os.PathLike,
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    alphas: Mapping[str, float],
    metadata: Mapping[str, str] | None = None,
    dtype: str = "fp16",
) -> Path:
    """Write a kohya-format LoRA with sd-scripts / modelspec metadata, atomically."""
    if dtype not in SAVE_DTYPES:
        raise DCOError(f"The save precision must be one of {', '.join(SAVE_DTYPES)}, not {dtype!r}.")
    kohya = peft_to_kohya(state_dicts, alphas)
    tensors = {k: (v if k.endswith(".alpha") else v.to(SAVE_DTYPES[dtype])) for k, v in kohya.items()}
    rank = next((v.shape[0] for k, v in kohya.items() if k.endswith("lora_down.weight")), 0)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alphas.get("unet", rank)),
        "ss_base_model_version": "sdxl_base_v1-0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.sai_model_spec": "1.0.0",
        **(metadata or {}),
    }
    return save_safetensors(path, tensors, meta)


def load_lora(path: str | os.PathLike) -> LoraFile:
    """Read a kohya-format LoRA (ours, or any kohya file with diffusers or SGM names)."""
    tensors, metadata = load_safetensors(path)
    modules: dict[str, dict[str, LoraModule]] = {}
    names = {k.rsplit(".lora_down.weight", 1)[0] for k in tensors if k.endswith(".lora_down.weight")}
    if not names:
        raise DCOError(
            f"{Path(path).name} holds no kohya-format LoRA keys (name.lora_down.weight / name.lora_up.weight); "
            "it is not a LoRA this pack can read."
        )
    for name in sorted(names):
        component = next((c for c, p in LORA_PREFIXES.items() if name.startswith(p + "_")), None)
        if component is None:
            raise DCOError(f"{Path(path).name}: the LoRA key {name} is not for an SDXL UNet or text encoder.")
        up = tensors.get(name + ".lora_up.weight")
        if up is None:
            raise DCOError(f"{Path(path).name}: {name} has a lora_down weight but no lora_up weight.")
        down = tensors[name + ".lora_down.weight"]
        alpha_t = tensors.get(name + ".alpha")
        alpha = float(alpha_t.item()) if alpha_t is not None else float(down.shape[0])
        modules.setdefault(component, {})[name] = LoraModule(down=down, up=up, alpha=alpha)
    return LoraFile(modules=modules, metadata=metadata)


# ------------------------------------------------------------------------------- embeddings
@dataclass
class TokenEmbeddings:
    """Learned token rows for both SDXL text encoders, one row per token in `tokens` order."""

    tokens: list[str]
    clip_l: torch.Tensor
    clip_g: torch.Tensor
    initializers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.clip_l.ndim == 1:
            self.clip_l = self.clip_l[None]
        if self.clip_g.ndim == 1:
            self.clip_g = self.clip_g[None]
        if len(self.tokens) != len(set(self.tokens)):
            raise DCOError(f"The token list {self.tokens} names a token twice.")
        for key, rows in (("clip_l", self.clip_l), ("clip_g", self.clip_g)):
            if rows.shape[0] < len(self.tokens):
                raise DCOError(
                    f"The embeddings have {rows.shape[0]} {key} row(s) but {len(self.tokens)} token(s) "
                    f"({', '.join(self.tokens)}); give at most {rows.shape[0]} token(s)."
                )
        if not self.initializers:
            self.initializers = [""] * len(self.tokens)

    @property
    def word_map(self) -> dict[str, str]:
        return dict(zip(self.tokens, self.initializers))

    def rows(self, key: str) -> torch.Tensor:
        if key not in EMBED_KEYS:
            raise ValueError(f"Unknown embedding key {key!r}.")
        return getattr(self, key)[: len(self.tokens)]


def save_embeddings(path: str | os.PathLike, emb: TokenEmbeddings, metadata: Mapping[str, str] | None = None) -> Path:
    meta = {
        META_TOKENS: json.dumps(emb.tokens),
        META_INITIALIZERS: json.dumps(emb.initializers),
        "format": "pt",
        **(metadata or {}),
    }
    tensors = {"clip_l": emb.rows("clip_l").float(), "clip_g": emb.rows("clip_g").float()}
    return save_safetensors(path, tensors, meta)


def load_embeddings(path: str | os.PathLike, tokens: list[str] | None = None) -> TokenEmbeddings:
    """Read an embeddings file. Tokens come from its metadata, or from `tokens` for reference
    `learned_embeds.safetensors` files that carry none (given tokens always win)."""
    tensors, meta = load_safetensors(path)
    missing = [k for k in EMBED_KEYS if k not in tensors]
    if missing:
        raise DCOError(
            f"{Path(path).name} has no {' or '.join(missing)} tensor; an SDXL token-embeddings file needs "
            "both clip_l and clip_g."
        )
    stored = json.loads(meta[META_TOKENS]) if META_TOKENS in meta else None
    initializers = json.loads(meta[META_INITIALIZERS]) if META_INITIALIZERS in meta else []
    if tokens:
        # rows are positional: a typed token list renames the file's rows in order
        chosen = list(tokens)
        initializers = (list(initializers) + [""] * len(chosen))[: len(chosen)]
    elif stored:
        chosen = list(stored)
    else:
        raise DCOError(
            f"{Path(path).name} does not record its tokens (a reference learned_embeds file); "
            "type them in, e.g. <dog>, one per row in the file's order."
        )
    return TokenEmbeddings(
        tokens=chosen, clip_l=tensors["clip_l"], clip_g=tensors["clip_g"], initializers=initializers
    )
