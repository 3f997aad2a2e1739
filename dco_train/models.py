"""Loading an SDXL into the modules the engine trains: a diffusers folder, a single file, a hub id.

Nothing is fetched from a hub unless the user names a hub id (`org/name` that is not a local
path). Single files go through the one SGM -> diffusers path in `sgm.py`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from . import sgm
from .errors import DCOError
from .text import fix_eos_pooling

log = logging.getLogger(__name__)


@dataclass
class SDXLComponents:
    """The parts of an SDXL, named as in a diffusers pipeline. `vae` may be None when the
    latents come from elsewhere (the ComfyUI node encodes with the graph's VAE)."""

    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any

    @property
    def tokenizers(self) -> list[Any]:
        return [self.tokenizer, self.tokenizer_2]

    @property
    def text_encoders(self) -> list[Any]:
        return [self.text_encoder, self.text_encoder_2]

    def training_scheduler(self, prediction_type: str | None = None):
        """A DDPMScheduler with this model's noise schedule (what add_noise and SNR need)."""
        from diffusers import DDPMScheduler

        config = dict(self.scheduler.config)
        if prediction_type:
            config["prediction_type"] = prediction_type
        return DDPMScheduler.from_config(config)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write a diffusers-format folder (what `--pretrained_model_name_or_path` accepts)."""
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(**{f.name: getattr(self, f.name) for f in fields(self)})
        pipe.save_pretrained(str(folder), safe_serialization=True)
        return Path(folder)

    def pipeline(self):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(**{f.name: getattr(self, f.name) for f in fields(self)})


SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    interpolation_type="linear", use_karras_sigmas=False,
)


SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
                  "StableDiffusionXLControlNetPipeline", "StableDiffusionXLAdapterPipeline")
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
WEIGHT_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not _looks_like_path(name) and not os.path.exists(name)


def _looks_like_path(name: str) -> bool:
    """Whether `name` was meant as a local path: it starts like one (`.`, `~`, `/`, a drive), uses a
    backslash or more than one `/` (hub ids are `org/name`), ends in a model-file suffix, or its
    first part is a folder that exists here (`models/sdxl` with a typo after `models/`)."""
    if name.startswith((".", "~", "/", "\\")) or "\\" in name or name.count("/") > 1 or (len(name) > 1 and name[1] == ":"):
        return True
    if name.lower().endswith(MODEL_SUFFIXES):
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (set in the environment or already imported)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's endpoint: seconds instead of huggingface_hub's retries."""
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_diffusers_folder(path: Path) -> None:
    """Refuse, by name, a diffusers folder that is not an SDXL (`model_index.json`'s pipeline class,
    or a UNet without SDXL's `text_time` added conditioning), or whose weights are only pickled
    `.bin` files (only safetensors are loaded: `from_pretrained(use_safetensors=True)`)."""
    index = path / "model_index.json"
    if index.is_file():
        try:
            cls = json.loads(index.read_text(encoding="utf-8-sig")).get("_class_name", "")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise DCOError(f"{index} is not valid JSON ({exc}); the folder is damaged.") from exc
        if cls and cls not in SDXL_PIPELINES:
            raise DCOError(
                f"{path} is a {cls} folder (model_index.json), not an SDXL; this trainer needs an SDXL base "
                "model such as stabilityai/stable-diffusion-xl-base-1.0."
            )
    unet_config = path / "unet" / "config.json"
    if unet_config.is_file():
        try:
            cfg = json.loads(unet_config.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DCOError(f"{unet_config} is not valid JSON ({exc}); the folder is damaged.") from exc
        if cfg.get("addition_embed_type") != "text_time":
            kind = f"cross-attention width {cfg.get('cross_attention_dim')}"
            raise DCOError(
                f"{path} holds a UNet without SDXL's text_time conditioning ({kind}: an SD 1.x/2.x-style model), "
                "not an SDXL; give an SDXL base model."
            )
    for sub in WEIGHT_SUBFOLDERS:
        folder = path / sub
        if folder.is_dir() and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
            raise DCOError(
                f"{folder} holds only pickled .bin weights; only .safetensors are loaded (a .bin file can run "
                "code). Convert the folder to safetensors (e.g. save_pretrained(..., safe_serialization=True))."
            )


def find_clip_tokenizer(tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """A local folder with CLIP's vocab.json + merges.txt (single files carry no tokenizer)."""
    candidates = []
    if tokenizer_dir:
        candidates.append(Path(tokenizer_dir))
    if os.environ.get("DCO_TOKENIZER_DIR"):
        candidates.append(Path(os.environ["DCO_TOKENIZER_DIR"]))
    here = Path(__file__).resolve()
    # inside ComfyUI/custom_nodes/<pack>/dco_train: ComfyUI ships the CLIP tokenizer
    candidates += [p / "comfy" / "sd1_tokenizer" for p in here.parents]
    for c in candidates:
        if (c / "vocab.json").is_file() and (c / "merges.txt").is_file():
            return c
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download("openai/clip-vit-large-patch14", local_files_only=True,
                                      allow_patterns=["vocab.json", "merges.txt", "*.json"]))
    except Exception:  # not in the local hub cache
        pass
    raise DCOError(
        "A single-file checkpoint carries no tokenizer and none was found locally; pass --tokenizer_dir "
        "with a folder holding CLIP's vocab.json and merges.txt (ComfyUI's comfy/sd1_tokenizer works)."
    )


def load_single_file(path: Path, tokenizer_dir: str | os.PathLike | None = None) -> SDXLComponents:
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTokenizer

    from .formats import load_safetensors

    state, _ = load_safetensors(path)
    tok_dir = find_clip_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(tok_dir), pad_token="!", model_max_length=77)
    eos = tokenizer.eos_token_id
    sched = dict(SDXL_SCHEDULER)
    if "v_pred" in state:
        sched["prediction_type"] = "v_prediction"
    return SDXLComponents(
        unet=sgm.unet_from_sgm(state),
        vae=sgm.vae_from_sgm(state),
        text_encoder=sgm.clip_l_from_sgm(state, eos_token_id=eos),
        text_encoder_2=sgm.clip_g_from_sgm(state, eos_token_id=eos),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler(**sched),
    )


def load_diffusers(name: str, local_only: bool) -> SDXLComponents:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = {"local_files_only": local_only}
    weights = {**kw, "use_safetensors": True}  # never unpickle a .bin
    try:
        return SDXLComponents(
            unet=UNet2DConditionModel.from_pretrained(name, subfolder="unet", **weights),
            vae=AutoencoderKL.from_pretrained(name, subfolder="vae", **weights),
            text_encoder=CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **weights),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", **weights),
            tokenizer=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kw),
            tokenizer_2=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **kw),
            scheduler=EulerDiscreteScheduler.from_pretrained(name, subfolder="scheduler", **kw),
        )
    except (OSError, ValueError) as exc:
        where = "folder" if local_only else "hub model"
        raise DCOError(f"Cannot load the SDXL {where} {name}: {exc}") from exc


def _load_from_hub(name: str) -> SDXLComponents:
    """A hub id: from the local cache if it is there, else downloaded; with no network (HF_HUB_OFFLINE,
    or the hub unreachable within seconds) a DCOError at once instead of a minute of retries."""
    try:
        return load_diffusers(name, local_only=True)
    except DCOError:
        pass
    if hub_offline():
        raise DCOError(f"{name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set (no network); "
                       "download it first, unset HF_HUB_OFFLINE, or give a local folder or .safetensors file.")
    if not hub_reachable():
        raise DCOError(f"{name} is not in the local Hugging Face cache and the hub cannot be reached (no network); "
                       "connect to the internet, or give a local folder or .safetensors file.")
    log.info("Loading %s from the Hugging Face hub (a hub id was named).", name)
    return load_diffusers(name, local_only=False)


def load_sdxl(name_or_path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> SDXLComponents:
    """An SDXL from a diffusers folder, a single-file .safetensors, or (only if named) a hub id."""
    name = str(name_or_path)
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        check_diffusers_folder(path)
        if not (path / "unet").is_dir():
            raise DCOError(f"{path} is not a diffusers SDXL folder (it has no unet/ subfolder).")
        comps = load_diffusers(str(path), local_only=True)
    elif path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise DCOError(f"{path.name}: only .safetensors single files are loaded (no pickled .ckpt).")
        comps = load_single_file(path, tokenizer_dir)
    elif _looks_like_path(name):
        raise DCOError(
            f"The local path {name} was not found (looked for {path.resolve()}); check the spelling, or give a "
            "diffusers folder, an SDXL .safetensors file, or a hub id (org/name)."
        )
    elif _looks_like_hub_id(name):
        comps = _load_from_hub(name)
    else:
        raise DCOError(f"The model {name} does not exist: give a diffusers folder, an SDXL .safetensors file, or a hub id.")
    for tok, enc in zip(comps.tokenizers, comps.text_encoders):
        fix_eos_pooling(enc, tok)
    for m in (comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2):
        m.requires_grad_(False).eval()
    return comps


def save_single_file(comps: SDXLComponents, path: str | os.PathLike) -> Path:
    """Write the components as one SGM-layout .safetensors (as ComfyUI's CheckpointSave does)."""
    from .formats import save_safetensors

    state = sgm.components_to_sgm(comps.unet, comps.vae, comps.text_encoder, comps.text_encoder_2)
    return save_safetensors(path, state, {"modelspec.architecture": "stable-diffusion-xl-v1-base"})
