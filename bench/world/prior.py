"""Pretrain an SDXL-shaped tiny text-to-image model on the world, and cache it as a diffusers folder.

The components are the engine's own kinds (dco_train/tiny.py's layout at other sizes): a diffusers
UNet2DConditionModel with SDXL's `text_time` conditioning, CLIP-L and CLIP-G text encoders (random
and frozen: a random transformer still gives every word its own embedding, and the UNet learns to
read them), word-level CLIP tokenizers over the world's words, and a 2-level AutoencoderKL (x2,
4 latent channels, no attention) whose ResNet blocks start as the identity and then train as a
generic codec of such images. The folder loads with `dco_train.models.load_sdxl`, so
`python -m dco_train train --pretrained_model_name_or_path <it>` and the sampler use it unchanged
(the sampler takes its latent size from the VAE's levels).

The cache is ~/.cache/comfyui-dco/world/<hash of the world and the recipe>/ (never committed);
a second call with the same recipe only loads it. Train with one thread: on 2 cores shared with another
job, two threads ran the VAE ten times slower.

Measured on the 32x32 world (1 thread, 2 shared cores; world_prior.json has every number). The
codec works: the VAE (2000 steps, ~105-140 s) reconstructs with a mean error of 3.8/255, and the
detectors read 100% of round trips right, the subject's tall two-tone diamond included (a square
diamond was rounded into a circle: 40%). The UNet (1500 steps at 16x16 latents, batch 32, ~14 min):
- first it ignored the caption's background and position (held-out accuracy 0.02, background 0.27,
  position 0.40). With SDXL's schedule the last step still holds 7% of the signal, enough to read in
  a 16x16 latent of flat colours, so the start noise chose the background (same seed, four asked
  backgrounds: one drawn). Per-channel offset noise 0.4 (the default) fixed it: background 1.00.
- position stayed at chance (0.42) with offset noise, with multi-resolution noise on top
  (`pyramid_discount` 0.5: 0.42; 0.8: 0.44), and with the text encoders trained (`text_lr` 2e-4, no offset):
  the samples were the same for all three position words. The cause was the caption: the random
  causal text encoders mixed a position said last into its context. Named first (the world's
  template now), position is followed 1.00, held-out and seen.
- the default recipe now draws seen captions right 0.79 of the time (shape 0.85, colour 0.92) and
  held-out ones 0.33 (shape 0.48, colour 0.79; background and position 1.00): an unseen
  shape-colour pair is the hard part, as composition should be.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import SIZE, WORDS, Scene, all_scenes, autoencoder_scenes, render, subject_scenes, training_scenes, world_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    vae_channels: tuple[int, ...] = (16, 32)  # one level per entry: x2 (the x8 of 4 levels lost the object)
    vae_steps: int = 2000
    vae_lr: float = 2e-3
    vae_object_weight: float = 4.0  # loss weight of pixels unlike the corner's (the object): its colour was lost
    vae_batch: int = 8
    unet_steps: int = 1500
    unet_batch: int = 32
    unet_lr: float = 1e-3
    latent_std: float = 1.0  # the VAE's scaling factor gives latents this std (< 1: a noisier schedule)
    noise_offset: float = 0.4  # per-channel offset noise: without it the start noise's mean picked the background
    pyramid_discount: float = 0.0  # > 0: multi-resolution noise, level k (1/2**k size) weighted discount**k
    text_lr: float = 0.0  # > 0: the text encoders train with the UNet; 0: they stay random and frozen
    unet_channels: tuple[int, ...] = (32, 64, 128)  # levels under 64 channels have no attention, as SDXL's first
    layers_per_block: int = 1
    train_images: int = 3000
    caption_dropout: float = 0.1
    ema: float = 0.998
    seed: int = 0

    def key(self) -> str:
        return world_hash(asdict(self))

    def latent_size(self) -> int:
        return SIZE // 2 ** (len(self.vae_channels) - 1)


def cache_root() -> Path:
    base = os.environ.get("DCO_WORLD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "comfyui-dco", "world")
    return Path(base)


def unet_config(recipe: Recipe) -> dict[str, Any]:
    from dco_train.tiny import UNET_CONFIG

    chans = tuple(recipe.unet_channels)
    attn = [c >= 64 for c in chans]
    return dict(UNET_CONFIG, sample_size=recipe.latent_size(), block_out_channels=chans,
                attention_head_dim=tuple(max(1, c // 64) for c in chans), transformer_layers_per_block=(1,) * len(chans),
                down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
                layers_per_block=recipe.layers_per_block)


def vae_config(recipe: Recipe) -> dict[str, Any]:
    """An AutoencoderKL with one level per `vae_channels` entry (scale 2 ** (levels - 1)), 4 latent
    channels, and no attention in its middle block (flat-coloured shapes need none)."""
    n = len(recipe.vae_channels)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(recipe.vae_channels),
                layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=SIZE, scaling_factor=1.0,
                mid_block_add_attention=False)


def near_identity_(vae: Any) -> None:
    """Zero every ResNet's second convolution, so each block starts as the identity and the codec
    as a shallow convolutional net (it then trains in minutes instead of failing to)."""
    with torch.no_grad():
        for name, m in vae.named_modules():
            if "resnets" in name and name.endswith("conv2"):
                m.weight.zero_()
                m.bias.zero_()


def build_untrained(recipe: Recipe, tok_dir: Path):
    """Fresh components: random frozen text encoders, an untrained VAE and UNet."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dco_train.models import SDXL_SCHEDULER, SDXLComponents
    from dco_train.text import fix_eos_pooling
    from dco_train.tiny import HIDDEN_G, HIDDEN_L, PROJECTION_G, build_tokenizer, text_encoder_config, write_tokenizer_files

    write_tokenizer_files(tok_dir, WORDS)
    tokenizer, tokenizer_2 = build_tokenizer(tok_dir), build_tokenizer(tok_dir, pad_token="!")
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    torch.manual_seed(recipe.seed)
    te = CLIPTextModel(text_encoder_config(vocab, eos, HIDDEN_L, "quick_gelu"))
    te2 = CLIPTextModelWithProjection(text_encoder_config(vocab, eos, HIDDEN_G, "gelu", PROJECTION_G))
    vae = AutoencoderKL(**vae_config(recipe))
    near_identity_(vae)
    unet = UNet2DConditionModel(**unet_config(recipe))
    comps = SDXLComponents(unet, vae, te, te2, tokenizer, tokenizer_2, EulerDiscreteScheduler(**SDXL_SCHEDULER))
    for tok, enc in zip(comps.tokenizers, comps.text_encoders):
        fix_eos_pooling(enc, tok)
        enc.requires_grad_(False).eval()
    return comps


def pixels(scenes: list[Scene]) -> torch.Tensor:
    arr = np.stack([np.asarray(render(s)) for s in scenes]).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def train_vae(vae: Any, recipe: Recipe, say: Callable[[str], None]) -> float:
    """Reconstruction (+ a tiny KL) on generic scenes; sets the scaling factor to unit latent std."""
    data = pixels(autoencoder_scenes(2000, recipe.seed + 1))
    g = torch.Generator().manual_seed(recipe.seed + 2)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.vae_lr, total_steps=recipe.vae_steps, pct_start=0.1)
    vae.train()
    for step in range(recipe.vae_steps):
        x = data[torch.randint(0, len(data), (recipe.vae_batch,), generator=g)]
        dist = vae.encode(x).latent_dist
        out = vae.decode(dist.sample(generator=g)).sample
        kl = dist.kl().mean() / x[0].numel()
        w = 1 + (recipe.vae_object_weight - 1) * ((x - x[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.1)
        loss = (w * ((out - x).abs() + (out - x) ** 2)).mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == recipe.vae_steps - 1:
            say(f"vae step {step} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        dist = vae.encode(data[:256]).latent_dist
        std = float(dist.mean.std())
        err = float((vae.decode(dist.mean).sample.clamp(-1, 1) - data[:256]).abs().mean() * 127.5)
    vae.register_to_config(scaling_factor=recipe.latent_std / std)
    say(f"vae latent std {std:.3f}, mean abs reconstruction error {err:.2f}/255")
    return err


@torch.no_grad()
def codec_accuracy(vae: Any, n: int = 96, seed: int = 8) -> dict[str, float]:
    """The detectors on VAE round trips (encode, decode the mean) of rendered prior scenes and subjects:
    the ceiling of every sampled score, since samples go through the same decoder."""
    from dco_train.sample import decode_latents
    from .detect import read

    scenes = training_scenes(n, seed) + subject_scenes()
    z = vae.encode(pixels(scenes)).latent_dist.mean * vae.config.scaling_factor
    hits = {"all": [], "subject": []}
    for s, im in zip(scenes, decode_latents(vae, z)):
        r = read(im)
        if s.colour == "subject":
            hits["subject"].append(r.subject)
        else:
            hits["all"].append((r.shape, r.colour, r.background, r.position) == (s.shape, s.colour, s.background, s.position))
    return {k: float(np.mean(v)) for k, v in hits.items()}


def pyramid_noise(shape: tuple[int, ...], g: torch.Generator, discount: float) -> torch.Tensor:
    """Gaussian noise plus upsampled coarser noise (sizes 1/2, 1/4, ... down to 1x1), level k weighted
    `discount ** k`, rescaled to unit std per sample: multi-resolution ("pyramid") noise, as kohya's
    sd-scripts offers (multires noise). Hand-written because no library we use ships it. Meant to
    keep the start noise's low frequencies from placing the object; measured here, it did not
    change position accuracy (the caption order did), so it stays off by default."""
    noise = torch.randn(shape, generator=g)
    if discount <= 0:
        return noise
    size, k = shape[-1] // 2, 1
    while size >= 1:
        coarse = torch.randn(shape[:2] + (size, size), generator=g)
        noise += discount ** k * torch.nn.functional.interpolate(coarse, size=shape[-2:], mode="bilinear")
        size, k = size // 2, k + 1
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


def _ema_update(ema: list[torch.nn.Module], live: list[torch.nn.Module], decay: float) -> None:
    with torch.no_grad():
        for me, ml in zip(ema, live):
            for pe, p in zip(me.parameters(), ml.parameters()):
                pe.lerp_(p, 1 - decay)


def train_unet(comps: Any, recipe: Recipe, say: Callable[[str], None]) -> None:
    """Epsilon-prediction training on the world's latents, min-SNR-5 weighted, with caption dropout
    to all-zero embeddings (what the sampler's empty negative is). With `text_lr` > 0 the two text
    encoders train too (a prior's text model is learned, not random); the EMA covers every part."""
    from dco_train.text import encode_prompts

    scenes = training_scenes(recipe.train_images, recipe.seed + 3)
    with torch.no_grad():
        lat = []
        for i in range(0, len(scenes), 64):
            lat.append(comps.vae.encode(pixels(scenes[i:i + 64])).latent_dist.mean * comps.vae.config.scaling_factor)
        latents = torch.cat(lat)
    captions = [s.caption() for s in scenes]
    train_text = recipe.text_lr > 0
    live = [comps.unet] + (list(comps.text_encoders) if train_text else [])
    ema = [copy.deepcopy(m).requires_grad_(False) for m in live]
    groups = [{"params": list(comps.unet.parameters()), "lr": recipe.unet_lr}]
    if train_text:
        for enc in comps.text_encoders:
            enc.requires_grad_(True).train()
        groups.append({"params": [p for e in comps.text_encoders for p in e.parameters()], "lr": recipe.text_lr})
    else:  # frozen encoders: encode each distinct caption once
        unique = sorted(set(captions))
        row = torch.tensor([unique.index(c) for c in captions])
        with torch.no_grad():
            frozen = encode_prompts(comps.tokenizers, comps.text_encoders, unique)
    sched = comps.training_scheduler()
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    g = torch.Generator().manual_seed(recipe.seed + 4)
    b = recipe.unet_batch
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32).repeat(b, 1)
    alphas = sched.alphas_cumprod
    comps.unet.train()
    t0, avg = time.time(), 0.0
    for step in range(recipe.unet_steps):
        idx = torch.randint(0, len(scenes), (b,), generator=g)
        x0 = latents[idx]
        noise = pyramid_noise(x0.shape, g, recipe.pyramid_discount)
        noise += recipe.noise_offset * torch.randn(x0.shape[:2] + (1, 1), generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        keep = (torch.rand(b, generator=g) >= recipe.caption_dropout).float()
        if train_text:
            enc = encode_prompts(comps.tokenizers, comps.text_encoders, [captions[i] for i in idx.tolist()])
            embeds, pooled = enc.embeds, enc.pooled
        else:
            embeds, pooled = frozen.embeds[row[idx]], frozen.pooled[row[idx]]
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        pred = comps.unet(xt, t, encoder_hidden_states=embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        snr = alphas[t] / (1 - alphas[t])
        w = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 weighting for epsilon prediction
        loss = (w * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for grp in groups for p in grp["params"]], 1.0)
        opt.step()
        warm.step()
        _ema_update(ema, live, min(recipe.ema, (step + 1) / (step + 10)))
        avg = 0.98 * avg + 0.02 * loss.item()
        if step % 100 == 0 or step == recipe.unet_steps - 1:
            say(f"unet step {step} loss {avg:.4f} ({time.time() - t0:.0f}s)")
    comps.unet = ema[0].eval()
    if train_text:
        comps.text_encoder, comps.text_encoder_2 = (e.eval() for e in ema[1:])


def sample_scenes(comps: Any, prompts: list[str], seeds: list[int], cfg: float = 5.0, rg: float = 0.0,
                  steps: int = 20, word_map: dict[str, str] | None = None) -> list[Any]:
    """One image per (prompt, seed) through the engine's RG sampler."""
    from dco_train.sample import SampleSettings, rg_sample

    out = []
    for prompt, seed in zip(prompts, seeds):
        s = SampleSettings(prompt=prompt, cfg=cfg, rg=rg, steps=steps, seed=seed, width=SIZE, height=SIZE)
        out += rg_sample(comps, s, word_map)
    return out


def composition_accuracy(comps: Any, scenes: list[Scene], seed: int = 100) -> dict[str, float]:
    """How often the prior draws each scene's caption right: every attribute, and each one alone."""
    from .detect import read

    images = sample_scenes(comps, [s.caption() for s in scenes], [seed + i for i in range(len(scenes))])
    hits = {"all": 0, "shape": 0, "colour": 0, "background": 0, "position": 0}
    for s, im in zip(scenes, images):
        r = read(im)
        ok = {"shape": r.shape == s.shape, "colour": r.colour == s.colour, "background": r.background == s.background,
              "position": r.position == s.position}
        hits["all"] += all(ok.values())
        for k, v in ok.items():
            hits[k] += v
    return {k: v / len(scenes) for k, v in hits.items()}


def build_prior(recipe: Recipe = Recipe(), say: Callable[[str], None] = print, root: Path | None = None) -> Path:
    """The cached prior's folder, trained now if it is not cached yet. Writes `world_prior.json`
    (recipe, timings, held-out and seen composition accuracy) beside the weights."""
    folder = (root or cache_root()) / recipe.key()
    if (folder / "world_prior.json").is_file():
        return folder
    torch.manual_seed(recipe.seed)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    comps = build_untrained(recipe, tmp / "_tok")
    err = train_vae(comps.vae, recipe, say)
    t_vae = time.time() - t0
    codec = codec_accuracy(comps.vae)
    say("codec round trips read right: " + " ".join(f"{k} {v:.3f}" for k, v in codec.items()))
    train_unet(comps, recipe, say)
    t_unet = time.time() - t0 - t_vae
    with torch.no_grad():
        held = composition_accuracy(comps, all_scenes(held_out=True))
        rng = np.random.default_rng(recipe.seed)
        seen_pool = all_scenes(held_out=False)
        seen = composition_accuracy(comps, [seen_pool[i] for i in rng.choice(len(seen_pool), 48, replace=False)])
    comps.save_pretrained(tmp)
    shutil.rmtree(tmp / "_tok", ignore_errors=True)
    info = dict(recipe=asdict(recipe), vae_seconds=round(t_vae, 1), unet_seconds=round(t_unet, 1),
                vae_error_255=round(err, 2), codec_accuracy=codec, held_out_accuracy=held, seen_accuracy=seen, torch_threads=torch.get_num_threads())
    (tmp / "world_prior.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    say(f"prior cached at {folder}: held-out accuracy {held['all']:.2f}, seen {seen['all']:.2f}")
    return folder


def prior_info(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "world_prior.json").read_text(encoding="utf-8"))


if __name__ == "__main__":
    import sys

    torch.set_num_threads(int(os.environ.get("DCO_WORLD_THREADS", "1")))
    print(build_prior(Recipe(**json.loads(sys.argv[1])) if len(sys.argv) > 1 else Recipe()))
