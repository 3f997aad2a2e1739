"""A graph's MODEL / CLIP / VAE as the engine's diffusers/transformers components.

The weights go through the engine's one SGM -> diffusers path (`dco_train.sgm`); then every
parameter becomes an ordinary tensor on the training device in the training dtype
(research/feasibility.md probes 2 and 3), with as few copies as the step needs:
- ComfyUI loads weights under `torch.inference_mode()`; such tensors cannot be saved for
  backward, and `p.data = ...` or `.to()` does not fix that. A fresh, ordinary tensor does: one
  that shares ComfyUI's storage (`Tensor.set_` outside inference mode) where the weight is
  already on the training device in the training dtype, else a copy in that dtype, made one
  tensor at a time so the source of each is freed as it goes.
- The MODEL/CLIP is loaded by ComfyUI first (`load_models_gpu`, fully), so the module holds this
  patcher's weights with its patches (a LoRA loaded earlier in the graph) baked in, and no other
  clone's. Baked weights are new tensors that ComfyUI's unpatching replaces, never overwrites.
- No second device copy: before copies are made on a GPU, this model alone is moved to ComfyUI's
  offload device, and only as much memory as the copies need is freed (`free_memory`), so other
  loaded models stay. (With `--gpu-only` the offload device is the GPU itself; a dtype change
  there, fp16 weights for bf16 training, keeps ComfyUI's copy beside ours.)
- Nothing is written to ComfyUI's modules: the graph's model is bit-identical afterwards.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch

from ..dco_train.errors import DCOError
from ..dco_train.models import SDXL_SCHEDULER, SDXLComponents
from ..dco_train.sgm import clip_from_hf, unet_from_sgm
from ..dco_train.text import fix_eos_pooling

log = logging.getLogger(__name__)


def _trainable(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """An ordinary tensor with `t`'s values on `device` in `dtype`: `t`'s own storage when nothing
    changes (no copy), else a copy. Call outside inference mode."""
    target = dtype if dtype is not None and t.is_floating_point() else t.dtype
    if t.device == device and t.dtype == target:
        out = torch.empty(0, dtype=t.dtype, device=t.device)
        return out.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
    return t.detach().to(device=device, dtype=target, copy=True)


def materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Replace every parameter and buffer by an ordinary tensor on `device` (in `dtype`), sharing
    storage where neither changes; each old tensor is released as its replacement is made."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = torch.nn.Parameter(_trainable(p.detach(), device, dtype), requires_grad=False)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = _trainable(b.detach(), device, None)
    return module


def _copy_bytes(sd: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None) -> int:
    """How many bytes `materialize` will allocate on `device` for `sd` (what it cannot share)."""
    total = 0
    for t in sd.values():
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if t.device != device or t.dtype != target:
            total += t.numel() * torch.empty((), dtype=target).element_size()
    return total


def _unload_only(patcher: Any) -> None:
    """Move this one model to ComfyUI's offload device. ComfyUI has no call for one model:
    `free_memory` unloads every loaded model on the device except those in `keep_loaded`."""
    import comfy.model_management as mm

    others = [lm for lm in mm.current_loaded_models if lm.model is not patcher]
    mm.free_memory(1e30, patcher.load_device, keep_loaded=others)


def _read_weights(patcher: Any, read: Any, device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The module's state dict with this patcher's patches applied, as tensors ComfyUI holds (not
    copied); when copies will be made on a GPU, the model first leaves it and room is made."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    sd = dict(read())
    if device.type == "cuda":
        needed = _copy_bytes(sd, device, dtype)
        if needed:
            _unload_only(patcher)
            mm.free_memory(needed, device)
    return sd


def check_sdxl(model: Any) -> None:
    import comfy.model_base

    inner = getattr(model, "model", None)
    if not isinstance(inner, comfy.model_base.SDXL):
        kind = type(inner).__name__ if inner is not None else type(model).__name__
        raise DCOError(
            f"The MODEL is a {kind}, not an SDXL model; DCO training needs an SDXL checkpoint "
            "(connect the MODEL output of Load Checkpoint with an SDXL file)."
        )


def unet_from_model(model: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    check_sdxl(model)
    config = model.model.model_config.unet_config
    diffusion_model = model.model.diffusion_model
    sd = _read_weights(model, diffusion_model.state_dict, device, dtype)
    with torch.inference_mode():  # ComfyUI's weights are inference tensors; only here may they be assigned
        unet = unet_from_sgm(sd, prefix="", num_head_channels=int(config.get("num_head_channels", 64)))
    del sd  # the module holds the only references now: each is freed as materialize replaces it
    return materialize(unet, device, dtype)


def prediction_type(model: Any) -> str:
    """epsilon or v_prediction, from the model's model_sampling (see `sampling_schedule`)."""
    return sampling_schedule(model)["prediction_type"]


# model_sampling kinds that have no epsilon / v-prediction training target in the engine
_UNTRAINABLE_SAMPLING = {
    "X0": "x0 prediction", "IMG_TO_IMG": "img_to_img (x0) prediction", "LCM": "LCM (distilled)",
    "ModelSamplingDiscreteDistilled": "LCM (distilled)", "EDM": "EDM", "CONST": "flow matching (CONST)",
    "ModelSamplingDiscreteFlow": "flow matching", "ModelSamplingContinuousEDM": "continuous EDM",
    "ModelSamplingContinuousV": "continuous v-prediction", "ModelSamplingFlux": "flow matching (Flux)",
}


def sampling_schedule(model: Any) -> dict[str, Any]:
    """The diffusers scheduler settings of the model as ComfyUI samples it.

    Read from the patched `model_sampling` object, not `model.model.model_type`: ComfyUI's
    ModelSamplingDiscrete node (v-prediction, zero terminal SNR) replaces only that object through
    a model patch. Its classes are mixins (LCM and X0 subclass EPS), so the refusals are checked
    first, by class name along the MRO. Zero terminal SNR is diffusers' `rescale_betas_zero_snr`; any
    other noise schedule than SDXL's is refused rather than trained with the wrong one.
    """
    import comfy.model_sampling as ms
    from diffusers import DDPMScheduler

    sampling = model.get_model_object("model_sampling")
    names = [c.__name__ for c in type(sampling).__mro__]
    for name in names:
        if name in _UNTRAINABLE_SAMPLING:
            raise DCOError(
                f"The model samples with {_UNTRAINABLE_SAMPLING[name]}, which DCO training cannot train (it trains "
                "epsilon and v-prediction SDXL). Train the checkpoint without the ModelSampling node, or set its "
                "sampling to eps or v_prediction."
            )
    if not isinstance(sampling, ms.ModelSamplingDiscrete):
        raise DCOError(f"The model's sampling ({type(sampling).__name__}) is not SDXL's discrete schedule; "
                       "DCO training needs an epsilon or v-prediction SDXL model.")
    kind = "v_prediction" if isinstance(sampling, ms.V_PREDICTION) else "epsilon"
    zsnr = bool(getattr(sampling, "zsnr", False))
    ours = DDPMScheduler(**{k: v for k, v in SDXL_SCHEDULER.items() if k in ("beta_start", "beta_end", "beta_schedule",
                                                                          "num_train_timesteps")},
                         rescale_betas_zero_snr=zsnr)
    expected = ((1 - ours.alphas_cumprod) / ours.alphas_cumprod).sqrt()[:-1]
    sigmas = sampling.sigmas.detach().float().cpu()[:-1]
    if sigmas.shape != expected.shape or not torch.allclose(sigmas, expected, rtol=1e-3, atol=1e-4):
        raise DCOError("The model's noise schedule is not SDXL's (scaled linear betas 0.00085-0.012 over 1000 "
                       "steps); DCO training would train it with the wrong noise. Train the checkpoint without the "
                       "node that changed its sampling.")
    return {"prediction_type": kind, "rescale_betas_zero_snr": zsnr}


def _activation_name(fn: Any) -> str:
    import comfy.clip_model

    for name, f in comfy.clip_model.ACTIVATIONS.items():
        if f is fn:
            return name
    raise DCOError("The CLIP uses an activation the trainer does not know; it is not an SDXL CLIP.")


def tokenizer_folder() -> str:
    import comfy.sd1_clip

    return os.path.join(os.path.dirname(os.path.realpath(comfy.sd1_clip.__file__)), "sd1_tokenizer")


def text_encoders_from_clip(clip: Any, device: torch.device, dtype: torch.dtype | None = None) -> tuple[Any, Any, Any, Any]:
    """(text_encoder, text_encoder_2, tokenizer, tokenizer_2) from an SDXL CLIP."""
    from transformers import CLIPTokenizer

    cond = clip.cond_stage_model
    if getattr(cond, "clip_l", None) is None or getattr(cond, "clip_g", None) is None:
        raise DCOError(
            f"The CLIP is a {type(cond).__name__}, not SDXL's pair of text encoders (clip_l + clip_g); connect the "
            "CLIP output of an SDXL checkpoint."
        )
    sd = _read_weights(clip.patcher, cond.state_dict, device, dtype)
    encoders = []
    for name, projection in (("clip_l", False), ("clip_g", True)):
        text_model = getattr(cond, name).transformer.text_model
        layer = text_model.encoder.layers[0]
        prefix = f"{name}.transformer."
        state = {k[len(prefix):]: sd.pop(k) for k in list(sd) if k.startswith(prefix)}
        with torch.inference_mode():
            module = clip_from_hf(
                state, hidden_act=_activation_name(layer.mlp.activation), eos_token_id=int(text_model.eos_token_id),
                projection=projection, num_heads=int(layer.self_attn.heads), what=f"{name} text encoder",
            )
        del state
        encoders.append(materialize(module, device, dtype))
    folder = tokenizer_folder()
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder, pad_token="!", model_max_length=77)
    for enc, tok in zip(encoders, (tokenizer, tokenizer_2)):
        fix_eos_pooling(enc, tok)
    return encoders[0], encoders[1], tokenizer, tokenizer_2


def components_from_graph(model: Any, clip: Any, device: torch.device, dtype: torch.dtype | None = None,
                          progress: Callable[[int, int], None] | None = None) -> SDXLComponents:
    """Engine components (no VAE: the node encodes with the graph's VAE) from a graph's MODEL and CLIP.
    `progress(done, 2)` runs before and after each of the two conversions (it may raise to cancel)."""
    from diffusers import EulerDiscreteScheduler

    report = progress or (lambda done, total: None)
    report(0, 2)
    unet = unet_from_model(model, device, dtype)
    report(1, 2)
    te, te2, tok, tok2 = text_encoders_from_clip(clip, device, dtype)
    report(2, 2)
    scheduler = EulerDiscreteScheduler(**{**SDXL_SCHEDULER, **sampling_schedule(model)})
    return SDXLComponents(unet=unet, vae=None, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                          tokenizer_2=tok2, scheduler=scheduler)


def vae_encoder(vae: Any, latent_format: Any):
    """The engine's `Encoder` on the graph's VAE: ComfyUI encodes the posterior mode, scaled here
    into the model's latent space (`latent_format.process_in`)."""

    @torch.no_grad()  # the graph's VAE may have requires_grad set; no graph may reach into it
    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, None]:
        image = ((pixels.float() + 1.0) / 2.0).clamp(0, 1).permute(1, 2, 0)[None]
        latent = vae.encode(image)
        return latent_format.process_in(latent)[0].detach().float().cpu().clone(), None

    return encode


def vae_decoder(vae: Any, latent_format: Any):
    """Latents in the model's space -> PIL images, with the graph's VAE (training previews)."""
    from PIL import Image

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> list[Any]:
        images = vae.decode(latent_format.process_out(latents.float().cpu()))
        if images.ndim == 5:
            images = images.reshape(-1, *images.shape[-3:])
        arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    return decode
