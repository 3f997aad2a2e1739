"""The files we write and read: kohya-format LoRA, `clip_l`/`clip_g` token embeddings.

Every file goes to a temporary name in the target folder and is renamed into place, so a crash
never leaves half a file under the real name. Only safetensors are read; nothing is unpickled.

LoRA keys (DESIGN 2.3): `lora_unet_<diffusers module path with _>.lora_down.weight`, `.lora_up.weight`
and `.alpha` for every module (text encoders: `lora_te1_` / `lora_te2_` with transformers' names).
ComfyUI's stock LoraLoader maps all of them for SDXL and diffusers' `load_lora_weights` reads them.
"""

from __future__ import annotations

import errno
import hashlib
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
# What a LoRA file records for DCO Load Subject (besides META_TOKENS / META_INITIALIZERS)
META_EMBEDDINGS = "dco.embeddings"  # the matching embeddings file's name
META_EMBEDDINGS_SHA256 = "dco.embeddings_sha256"  # sha256 of that file's bytes
META_CFG = "dco.cfg"  # recommended CFG scale
META_RG = "dco.rg"  # recommended reward-guidance scale
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ------------------------------------------------------------------------------- atomic files
def current_umask() -> int:
    """The process umask (read by setting and restoring it: the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_error(path: Path, exc: OSError) -> DCOError:
    """A sentence for a failed write: full disk, read-only or forbidden folder, or other."""
    reasons = {
        errno.ENOSPC: "the disk is full; free some space or choose a folder on another disk",
        errno.EROFS: "the file system is read-only; choose a writable output folder",
        errno.EACCES: "permission is denied; choose a folder you can write to",
        errno.EPERM: "permission is denied; choose a folder you can write to",
        getattr(errno, "EDQUOT", -1): "the disk quota is exceeded; free some space or choose another folder",
    }
    why = reasons.get(exc.errno, f"{exc.strerror or exc}; check the folder and try again")
    return DCOError(f"Cannot write {path}: {why}.")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` for a temporary file next to `path`, then rename it onto `path`.

    The file gets the permissions of an ordinary new file (0666 minus the umask, as ComfyUI's own
    outputs), not mkstemp's private 0600, so other users of a shared install can read it. A write
    that fails (full disk, read-only folder) leaves the earlier file under `path` untouched and
    ends in a DCOError naming the path."""
    path = Path(path)
    if not path.parent.is_dir():
        raise DCOError(f"The folder {path.parent} does not exist; create it or choose another output folder.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise output_error(path, exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        if os.name != "nt":  # Windows has no mode bits beyond read-only; mkstemp's file is writable there
            os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except OSError as exc:
        raise output_error(path, exc) from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    # No tensors with an empty metadata dict makes safetensors (0.8) write an unreadable header
    # (`{},"__metadata__":{}}`): an optimizer state that is still empty, say. No metadata is valid.
    return atomic_write(path, lambda tmp: save_file(clean, str(tmp), metadata=meta or None))


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
    meta = {**lora_metadata(kohya, alphas.get("unet")), **(metadata or {})}
    return save_safetensors(path, tensors, meta)


REFERENCE_COMPONENTS = ("text_encoder_2", "text_encoder", "unet")  # longest prefix first


def is_reference_lora(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether the keys are diffusers' LoRA format (`unet.<module>.lora.down.weight`, the
    reference's `pytorch_lora_weights.safetensors`) or peft's (`unet.<module>.lora_A.weight`)."""
    return any(k.startswith(tuple(c + "." for c in REFERENCE_COMPONENTS))
               and (".lora.down." in k or ".lora_A." in k or ".lora_linear_layer.down." in k) for k in tensors)


def reference_to_peft(tensors: Mapping[str, torch.Tensor], name: str = "the LoRA") -> dict[str, dict[str, torch.Tensor]]:
    """Split a diffusers/peft-format LoRA into peft state dicts per component (`to_q.lora_A.weight`),
    with diffusers' own key converters (`convert_unet_state_dict_to_peft` for the UNet's
    `lora.down`/`lora.up`, `convert_state_dict_to_peft` for the text encoders' `lora_linear_layer`)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        component = next((c for c in REFERENCE_COMPONENTS if key.startswith(c + ".")), None)
        if component is None:
            raise DCOError(f"{name}: the key {key} is not for an SDXL UNet or text encoder (unet., text_encoder., "
                           "text_encoder_2.); it is not a LoRA this pack can read.")
        parts.setdefault(component, {})[key[len(component) + 1:]] = value
    out = {}
    for component, sd in parts.items():
        if not any(".lora_A." in k for k in sd):
            sd = convert_unet_state_dict_to_peft(sd) if component == "unet" else convert_state_dict_to_peft(sd)
        bad = [k for k in sd if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
        if bad:
            raise DCOError(f"{name}: cannot read the LoRA key {component}.{bad[0]} (expected lora.down / lora.up "
                           "or lora_A / lora_B weights).")
        out[component] = dict(sd)
    return out


def reference_to_kohya(tensors: Mapping[str, torch.Tensor], name: str = "the LoRA") -> dict[str, torch.Tensor]:
    """A reference (diffusers/peft-format) LoRA as kohya keys with an explicit `.alpha` per module.

    Those files store no alpha; diffusers applies them at scale 1, i.e. alpha = rank, which is what
    is written, so the kohya file has the same effect in ComfyUI as the original in diffusers."""
    kohya = peft_to_kohya(reference_to_peft(tensors, name), {c: 1.0 for c in LORA_PREFIXES})
    for key in [k for k in kohya if k.endswith(".alpha")]:
        down = kohya[key[: -len(".alpha")] + ".lora_down.weight"]
        kohya[key] = torch.tensor(float(down.shape[0]), dtype=torch.float32)
    return kohya


def lora_metadata(kohya: Mapping[str, torch.Tensor], alpha: float | None = None) -> dict[str, str]:
    """sd-scripts / modelspec metadata for a kohya-format SDXL LoRA."""
    rank = next((int(v.shape[0]) for k, v in kohya.items() if k.endswith("lora_down.weight")), 0)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha if alpha is not None else rank),
        "ss_base_model_version": "sdxl_base_v1-0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.sai_model_spec": "1.0.0",
    }


def load_lora(path: str | os.PathLike) -> LoraFile:
    """Read a kohya-format LoRA (ours, or any kohya file with diffusers or SGM names), or a
    reference / diffusers / peft-format one (`pytorch_lora_weights.safetensors`), converted."""
    tensors, metadata = load_safetensors(path)
    if is_reference_lora(tensors) and not any(k.endswith(".lora_down.weight") for k in tensors):
        tensors = reference_to_kohya(tensors, Path(path).name)
    modules: dict[str, dict[str, LoraModule]] = {}
    names = {k.rsplit(".lora_down.weight", 1)[0] for k in tensors if k.endswith(".lora_down.weight")}
    if not names:
        raise DCOError(
            f"{Path(path).name} holds no kohya-format LoRA keys (name.lora_down.weight / name.lora_up.weight) "
            "nor diffusers-format ones (unet.name.lora.down.weight); it is not a LoRA this pack can read."
        )
    for name in sorted(names):
        component = next((c for c, p in LORA_PREFIXES.items() if name.startswith(p + "_")), None)
        if component is None:
            raise DCOError(f"{Path(path).name}: the LoRA key {name} is not for an SDXL UNet or text encoder.")
        up = tensors.get(name + ".lora_up.weight")
        if up is None:
            raise DCOError(f"{Path(path).name}: {name} has a lora_down weight but no lora_up weight.")
        down = tensors[name + ".lora_down.weight"]
        if down.ndim < 2 or up.ndim < 2 or up.shape[1] != down.shape[0]:
            raise DCOError(f"{Path(path).name}: {name} has lora_down {tuple(down.shape)} and lora_up "
                           f"{tuple(up.shape)}, which do not fit together; the file is damaged.")
        alpha_t = tensors.get(name + ".alpha")
        alpha = float(alpha_t.item()) if alpha_t is not None else float(down.shape[0])
        modules.setdefault(component, {})[name] = LoraModule(down=down, up=up, alpha=alpha)
    return LoraFile(modules=modules, metadata=metadata)


def check_lora_shapes(name: str, component: str, targets: Mapping[str, tuple[LoraModule, torch.nn.Module]]) -> None:
    """Refuse, naming the file and the first key, a LoRA whose module names match the model but whose
    shapes do not (a LoRA made for another model of the same layout): `targets` maps each module
    name to (its LoRA, the model's layer). Without this the copy ends in a torch RuntimeError."""
    for module_name, (m, layer) in targets.items():
        weight = getattr(layer, "weight", None)
        if weight is None:
            continue
        out_f, in_f = int(weight.shape[0]), int(weight.shape[1])
        if int(m.down.shape[1]) != in_f or int(m.up.shape[0]) != out_f:
            raise DCOError(
                f"{name}: the {component} LoRA for {module_name} is {int(m.down.shape[1])} -> {int(m.up.shape[0])} "
                f"wide but the model's layer is {in_f} -> {out_f}; the LoRA was made for another model. Use a "
                "LoRA trained on this base model."
            )


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


# ------------------------------------------------------------------------------- subject metadata
def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's metadata, read from its header only (no tensor is loaded)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DCOError(f"The file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise DCOError(f"Cannot read {path}: it is not a valid safetensors file ({exc}).") from exc


def subject_metadata(embeddings: str | os.PathLike | None, cfg: float, rg: float) -> dict[str, str]:
    """The LoRA-file metadata that lets one loader find everything of a trained subject: the
    embeddings file written with it (name and sha256 of its bytes; absent for a run without
    tokens) and the recommended guidance scales. The tokens and their words are META_TOKENS /
    META_INITIALIZERS, which training writes as well."""
    meta = {META_CFG: repr(float(cfg)), META_RG: repr(float(rg))}
    if embeddings is not None:
        meta[META_EMBEDDINGS] = Path(embeddings).name
        meta[META_EMBEDDINGS_SHA256] = file_sha256(embeddings)
    return meta


@dataclass
class SubjectInfo:
    """What a LoRA file says about its subject; every field is empty when the file says nothing."""

    tokens: list[str] = field(default_factory=list)
    words: list[str] = field(default_factory=list)
    embeddings: str | None = None
    embeddings_sha256: str | None = None
    cfg: float | None = None
    rg: float | None = None

    @property
    def word_map(self) -> dict[str, str]:
        return dict(zip(self.tokens, self.words))


def _json_list(meta: Mapping[str, str], key: str, name: str) -> list[str]:
    if key not in meta:
        return []
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DCOError(f"{name}: its {key} metadata is not a list of strings ({meta[key][:80]!r}); the file is damaged. "
                       "Type the tokens in instead.")
    return value


def _scale(meta: Mapping[str, str], key: str, config_key: str) -> float | None:
    """A recommended scale: its own key, or (files from before it was recorded) the preview
    setting in the stored training config."""
    try:
        if key in meta:
            return float(meta[key])
        config = json.loads(meta.get("dco.config", "{}"))
        return float(config[config_key]) if isinstance(config, dict) and config_key in config else None
    except (TypeError, ValueError):
        return None


def read_subject_metadata(meta: Mapping[str, str], name: str = "the LoRA") -> SubjectInfo:
    """The subject a LoRA's metadata describes (see `subject_metadata`). Files written before it
    existed give their tokens and scales but no embeddings file; others (reference files, other
    trainers' LoRAs) give an empty SubjectInfo."""
    tokens = _json_list(meta, META_TOKENS, name)
    words = _json_list(meta, META_INITIALIZERS, name)
    return SubjectInfo(
        tokens=tokens,
        words=(words + [""] * len(tokens))[: len(tokens)],
        embeddings=meta.get(META_EMBEDDINGS) or None,
        embeddings_sha256=meta.get(META_EMBEDDINGS_SHA256) or None,
        cfg=_scale(meta, META_CFG, "validation_cfg"),
        rg=_scale(meta, META_RG, "validation_rg"),
    )
