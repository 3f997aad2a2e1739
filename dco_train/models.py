"""Loading an SDXL into the modules the engine trains: a diffusers folder, a single file, a hub id.

Nothing is fetched from a hub unless the user names a hub id (`org/name` that is not a local
path). Single files go through the one SGM -> diffusers path in `sgm.py`.
"""

from __future__ import annotations

import logging
import os
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


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


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
    try:
        return SDXLComponents(
            unet=UNet2DConditionModel.from_pretrained(name, subfolder="unet", **kw),
            vae=AutoencoderKL.from_pretrained(name, subfolder="vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **kw),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **kw),
            tokenizer_2=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **kw),
            scheduler=EulerDiscreteScheduler.from_pretrained(name, subfolder="scheduler", **kw),
        )
    except (OSError, ValueError) as exc:
        where = "folder" if local_only else "hub model"
        raise DCOError(f"Cannot load the SDXL {where} {name}: {exc}") from exc


def load_sdxl(name_or_path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> SDXLComponents:
    """An SDXL from a diffusers folder, a single-file .safetensors, or (only if named) a hub id."""
    name = str(name_or_path)
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise DCOError(f"{path} is not a diffusers SDXL folder (it has no unet/ subfolder).")
        comps = load_diffusers(str(path), local_only=True)
    elif path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise DCOError(f"{path.name}: only .safetensors single files are loaded (no pickled .ckpt).")
        comps = load_single_file(path, tokenizer_dir)
    elif _looks_like_hub_id(name):
        log.info("Loading %s from the Hugging Face hub (a hub id was named).", name)
        comps = load_diffusers(name, local_only=False)
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
