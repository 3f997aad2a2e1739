"""Reward-guidance sampling for diffusers SDXL components (DESIGN 2.4), any size, batch, scheduler.

Per step, with the LoRA (every adapter on the UNet, and the text encoders' if any) switched off
for the negative and base passes and on for the token pass:

    ε = ε_ref(∅) + cfg · (ε_ref(c_base) − ε_ref(∅)) + rg · (ε_θ(c) − ε_ref(c_base))

The negative and base passes run as one batch; rg = 0 is plain CFG with the fine-tuned model on
the token prompt and costs no extra pass. cfg = 1 drops only the negative pass (its weight is 0);
reward guidance, the LoRA and the tokens are honoured at every cfg.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import DCOError
from .formats import LORA_PREFIXES, check_lora_shapes, load_embeddings, load_lora
from .lora import lora_disabled, refresh_layers
from .models import SDXLComponents
from .rg import cfg_mix, check_window, is_full_window, rg_mix, window_timesteps
from .schedulers import SCHEDULERS
from .text import PromptEmbeds, encode_prompts, replace_tokens
from .ti import TokenSet, install_embeddings

log = logging.getLogger(__name__)



OUTSIDE = ("ft", "base")  # what runs outside the rg_start..rg_end window


@dataclass
class SampleSettings:
    prompt: str
    base_prompt: str | None = None  # derived from the token -> word map when None
    negative_prompt: str | None = None  # None: all-zero embeddings (diffusers' SDXL force_zeros_for_empty_prompt)
    cfg: float = 7.5
    rg: float = 3.0
    steps: int = 30
    scheduler: str = "euler"
    seed: int = 0
    width: int = 1024
    height: int = 1024
    num_images: int = 1
    rg_start: float = 0.0  # reward guidance from this fraction of the schedule ...
    rg_end: float = 1.0  # ... to this one
    outside: str = "ft"  # outside it plain CFG: "ft" (fine-tuned, token prompt) or "base" (base, base prompt)

    def __post_init__(self) -> None:
        check_window(self.rg_start, self.rg_end)
        if self.outside not in OUTSIDE:
            raise DCOError(f"outside must be one of {', '.join(OUTSIDE)}, not {self.outside!r}.")
        if self.width % 8 or self.height % 8 or self.width < 8 or self.height < 8:
            raise DCOError(f"width and height must be positive multiples of 8, not {self.width}x{self.height}.")
        if self.steps < 1 or self.num_images < 1:
            raise DCOError("steps and num_images must be at least 1.")


def check_scheduler_name(name: str) -> None:
    """Refuse an unknown scheduler name before any model loads."""
    import diffusers

    cls_name, _ = SCHEDULERS.get(name, (name, {}))
    try:
        cls = getattr(diffusers, cls_name, None)
    except ImportError as exc:  # diffusers' dummy objects raise when an optional library (scipy) is missing
        raise DCOError(f"The scheduler {name!r} needs a library that is not installed ({' '.join(str(exc).split())[:200]}); "
                       "install it or choose another --scheduler.") from None
    if not hasattr(cls, "from_config"):
        raise DCOError(f"Unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)} or a diffusers scheduler class name.")


def make_scheduler(name: str, config: Any):
    """A diffusers scheduler by short name (euler, dpmpp_2m, ...) or class name, on this model's schedule."""
    import diffusers

    check_scheduler_name(name)
    cls_name, extra = SCHEDULERS.get(name, (name, {}))
    try:
        return getattr(diffusers, cls_name).from_config({**dict(config), **extra})
    except ImportError as exc:
        raise DCOError(f"The scheduler {name!r} needs a library that is not installed ({' '.join(str(exc).split())[:200]}); "
                       "install it or choose another --scheduler.") from None


@dataclass
class LoadedAdapters:
    """What `load_adapters` put on the components, so `unload` can take it off again."""

    names: list[str] = field(default_factory=list)
    token_set: TokenSet | None = None
    word_map: dict[str, str] = field(default_factory=dict)


def _module_names(model: torch.nn.Module, prefix: str, text: bool) -> dict[str, str]:
    names = {}
    for name, _ in model.named_modules():
        full = name if (not text or name.startswith("text_model.")) else "text_model." + name
        names[prefix + "_" + full.replace(".", "_")] = name
    return names


def load_adapters(
    comps: SDXLComponents, loras: Sequence[tuple[str | Path, float]], embeddings: str | Path | None = None,
    tokens: Sequence[str] | None = None,
) -> LoadedAdapters:
    """Put LoRA files (each with its weight) on the UNet/text encoders as peft adapters and make an
    embeddings file's tokens usable. All adapters are active together (a merge) when the LoRA is on."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    loaded = LoadedAdapters()
    models = {"unet": comps.unet, "text_encoder": comps.text_encoder, "text_encoder_2": comps.text_encoder_2}
    for i, (path, weight) in enumerate(loras):
        lora = load_lora(path)
        name = f"lora{i}"
        for component, modules in lora.modules.items():
            model = models[component]
            table = _module_names(model, LORA_PREFIXES[component], text=component != "unet")
            unknown = [k for k in modules if k not in table]
            if unknown:
                raise DCOError(
                    f"{Path(path).name}: {len(unknown)} LoRA modules do not exist in this model's {component} "
                    f"(e.g. {unknown[0]}); the LoRA was made for another architecture."
                )
            targets = {table[k]: m for k, m in modules.items()}
            check_lora_shapes(Path(path).name, component, {n: (m, model.get_submodule(n)) for n, m in targets.items()})
            config = LoraConfig(
                r=max(m.rank for m in targets.values()), lora_alpha=1.0, target_modules=list(targets),
                rank_pattern={f"^{k}$".replace(".", r"\."): m.rank for k, m in targets.items()},
                alpha_pattern={f"^{k}$".replace(".", r"\."): m.alpha for k, m in targets.items()},
            )
            with warnings.catch_warnings():  # a second adapter (a merge) is what we want here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(config, model, adapter_name=name)
            with torch.no_grad():
                for module_name, m in targets.items():
                    layer = model.get_submodule(module_name)
                    layer.lora_A[name].weight.copy_(m.down.to(layer.lora_A[name].weight))
                    layer.lora_B[name].weight.copy_((m.up.float() * weight).to(layer.lora_B[name].weight))
        loaded.names.append(name)
        if not loaded.word_map and lora.metadata.get("dco.tokens"):
            import json

            loaded.word_map = dict(zip(json.loads(lora.metadata["dco.tokens"]), json.loads(lora.metadata.get("dco.initializers", "[]"))))
    for model in models.values():
        refresh_layers(model)
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer) and loaded.names:
                layer.set_adapter([n for n in loaded.names if n in layer.lora_A])
    if embeddings is not None:
        emb = load_embeddings(embeddings, list(tokens) if tokens else None)
        loaded.token_set = install_embeddings(comps.tokenizers, comps.text_encoders, emb)
        loaded.word_map = {**loaded.word_map, **emb.word_map}
    return loaded


def _encode(comps: SDXLComponents, prompts: list[str | None], lora_on: bool) -> PromptEmbeds:
    """Encode prompts; a None prompt (no negative prompt) gives all-zero embeddings, as diffusers'
    SDXL pipelines do with `force_zeros_for_empty_prompt` (the reference samples that way too)."""
    if all(p is None for p in prompts):
        real = _encode(comps, [""], lora_on)
        n = len(prompts)
        return PromptEmbeds(torch.zeros_like(real.embeds).repeat(n, 1, 1), torch.zeros_like(real.pooled).repeat(n, 1))
    ctx = contextlib.nullcontext() if lora_on else lora_disabled(*comps.text_encoders)
    with ctx:
        return encode_prompts(comps.tokenizers, comps.text_encoders, prompts)


class RGDenoiser:
    """The guided prediction of one sampling step: `denoiser(x_in, t) -> ε` (DESIGN 2.4).

    Prompts are encoded once. With rg != 0 it makes two UNet calls per step: the negative and base
    prompts batched with the LoRA off, then the token prompt with it on. rg = 0 is one call (the
    negative and token prompts batched, LoRA on): plain CFG with the fine-tuned model. Outside the
    rg_start..rg_end window a step is plain CFG too, of the fine-tuned model on the token prompt
    or of the base model on the base prompt (`outside`): one call, no token pass.
    """

    def __init__(self, comps: SDXLComponents, s: SampleSettings, word_map: dict[str, str] | None = None,
                 autocast: Callable[[], Any] = contextlib.nullcontext):
        self.comps, self.s, self.autocast = comps, s, autocast
        self.unet = comps.unet
        self.device = next(self.unet.parameters()).device
        self.base_prompt = s.base_prompt if s.base_prompt is not None else replace_tokens(s.prompt, word_map or {})
        n = s.num_images
        self.use_neg = s.cfg != 1.0  # at cfg 1 the negative's weight (1 - cfg) is 0
        partial = not is_full_window(s.rg_start, s.rg_end)
        self.window = window_timesteps(s.rg_start, s.rg_end, getattr(comps.scheduler.config, "num_train_timesteps", 1000))
        with autocast():
            self.token = _encode(comps, [s.prompt] * n, lora_on=True)
            if s.rg == 0 or (partial and s.outside == "ft"):
                neg = _encode(comps, [s.negative_prompt] * n, lora_on=True) if self.use_neg else None
                self.conds = PromptEmbeds.cat([neg, self.token]) if neg is not None else self.token
            if s.rg != 0 or (partial and s.outside == "base"):
                base = _encode(comps, [self.base_prompt] * n, lora_on=False)
                neg = _encode(comps, [s.negative_prompt] * n, lora_on=False) if self.use_neg else None
                self.ref = PromptEmbeds.cat([neg, base]) if neg is not None else base
        self.time_ids = torch.tensor([[s.height, s.width, 0, 0, s.height, s.width]], dtype=torch.float32, device=self.device)

    def unet_call(self, x: torch.Tensor, t: torch.Tensor, cond: PromptEmbeds) -> torch.Tensor:
        n = x.shape[0]
        k = cond.embeds.shape[0] // n
        with self.autocast():
            out = self.unet(torch.cat([x] * k), t, encoder_hidden_states=cond.embeds.to(self.device),
                            added_cond_kwargs={"text_embeds": cond.pooled.to(self.device),
                                               "time_ids": self.time_ids.repeat(k * n, 1)}).sample
        return out.float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n, s = x.shape[0], self.s
        high, low = self.window
        outside = not low <= float(t) <= high
        if (s.outside == "ft") if outside else s.rg == 0:  # plain CFG of the fine-tuned model
            out = self.unet_call(x, t, self.conds)
            return cfg_mix(out[:n], out[n:], s.cfg) if self.use_neg else out
        with lora_disabled(self.unet):
            r = self.unet_call(x, t, self.ref)
        if outside:  # "base": plain CFG of the base model on the base prompt
            return cfg_mix(r[:n], r[n:], s.cfg) if self.use_neg else r
        e_base = r[n:] if self.use_neg else r
        e_neg = r[:n] if self.use_neg else e_base
        e_tok = self.unet_call(x, t, self.token)
        return rg_mix(e_neg, e_base, e_tok, s.cfg, s.rg)


def latent_scale(vae: Any) -> int:
    """Pixels per latent cell: 2 ** (levels - 1) of an AutoencoderKL (8 for SDXL's), 8 without a VAE."""
    if vae is None or not hasattr(vae.config, "block_out_channels"):
        return 8
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def rg_sample(
    comps: SDXLComponents, s: SampleSettings, word_map: dict[str, str] | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext, decode: Callable[[torch.Tensor], list[Any]] | None = None,
    output_type: str = "pil", progress_bar: bool = False, on_step: Callable[[int, int], None] | None = None,
):
    """Sample `s.num_images` images with reward guidance; returns PIL images (or latents).
    `on_step(done, total)` is called after every step (it may raise to stop sampling)."""
    denoiser = RGDenoiser(comps, s, word_map, autocast)
    scheduler = make_scheduler(s.scheduler, comps.scheduler.config)
    scheduler.set_timesteps(s.steps, device=denoiser.device)
    generator = torch.Generator().manual_seed(s.seed)
    f = latent_scale(comps.vae)
    shape = (s.num_images, comps.unet.config.in_channels, s.height // f, s.width // f)
    latents = torch.randn(shape, generator=generator).to(denoiser.device) * scheduler.init_noise_sigma
    # heun, lms, pndm and unipc take no generator (they add no noise in step())
    step_kw = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    from tqdm.auto import tqdm

    timesteps = scheduler.timesteps
    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress_bar, dynamic_ncols=True)):
        eps = denoiser(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents, **step_kw).prev_sample
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    if output_type == "latent":
        return latents
    return (decode or (lambda z: decode_latents(comps.vae, z)))(latents)


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> list[Any]:
    from PIL import Image

    if vae is None:
        raise DCOError("No VAE to decode the samples with.")
    param = next(vae.parameters())
    z = latents.to(param.device, torch.float32) / vae.config.scaling_factor
    if param.dtype != torch.float32:  # SDXL's VAE overflows in fp16
        vae.to(dtype=torch.float32)
    images = vae.decode(z).sample
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def render_previews(comps: SDXLComponents, cfg: Any, token_set: TokenSet | None, autocast: Callable[[], Any],
                    decode: Callable[[torch.Tensor], list[Any]] | None = None,
                    on_step: Callable[[int, int], None] | None = None) -> list[Any]:
    """The training previews: every validation prompt with RG at a fixed seed, with the LoRA and
    TI rows as they are now. Train/eval modes are put back; no training RNG is consumed.
    `on_step(done, total)` counts the sampling steps of all prompts together."""
    modes = [(m, m.training) for m in (comps.unet, *comps.text_encoders)]
    for m, _ in modes:
        m.eval()
    try:
        word_map = token_set.word_map if token_set else {}
        images = []
        total = len(cfg.validation_prompts) * cfg.validation_steps
        for n, prompt in enumerate(cfg.validation_prompts):
            s = SampleSettings(prompt=prompt, cfg=cfg.validation_cfg, rg=cfg.validation_rg, steps=cfg.validation_steps,
                               seed=cfg.validation_seed, width=cfg.resolution, height=cfg.resolution)
            counted = (lambda done, _, base=n * cfg.validation_steps: on_step(base + done, total)) if on_step else None
            images += rg_sample(comps, s, word_map, autocast=autocast, decode=decode, on_step=counted)
        return images
    finally:
        for m, mode in modes:
            m.train(mode)
