"""Reward-guidance sampling in the engine (DESIGN 2.4) and the training previews."""

import pytest
import torch

from helpers import quick_config
from dco_train.lora import UNET_TARGETS, add_lora, lora_disabled
from dco_train.sample import RGDenoiser, SampleSettings, load_adapters, rg_sample
from dco_train.text import encode_prompts
from dco_train.tiny import build_tiny_sdxl
from dco_train.train import Callbacks, RunOptions, train


def _with_lora(tiny):
    params = add_lora(tiny.unet, 4, 4.0, UNET_TARGETS, seed=0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.2)
    return tiny


def _cond(tiny, prompt, n):
    return encode_prompts(tiny.tokenizers, tiny.text_encoders, [prompt] * n)


def test_one_rg_step_equals_three_separate_unet_calls(tiny):
    tiny = _with_lora(tiny)
    s = SampleSettings(prompt="a dog on the beach", base_prompt="a toy on the beach", negative_prompt="blurry",
                       cfg=6.0, rg=2.5, width=64, height=48, num_images=2)
    x, t = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(700)
    time_ids = torch.tensor([[48.0, 64, 0, 0, 48, 64]] * 2)

    def eps(prompt, on):
        c = _cond(tiny, prompt, 2)
        kw = dict(encoder_hidden_states=c.embeds, added_cond_kwargs={"text_embeds": c.pooled, "time_ids": time_ids})
        if on:
            return tiny.unet(x, t, **kw).sample
        with lora_disabled(tiny.unet):
            return tiny.unet(x, t, **kw).sample

    with torch.no_grad():
        neg, base, tok = eps("blurry", False), eps("a toy on the beach", False), eps("a dog on the beach", True)
        by_hand = neg + 6.0 * (base - neg) + 2.5 * (tok - base)
        ours = RGDenoiser(tiny, s)(x, t)
    # batching the two reference passes changes only float32 rounding, which cfg = 6 amplifies: 1e-4
    assert (ours - by_hand).abs().max().item() < 1e-4
    assert (tok - base).abs().max().item() > 1e-3  # the LoRA term is not trivially zero


def _count_calls(unet):
    calls = []
    unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return calls


def test_rg_zero_calls_the_unet_as_often_as_plain_cfg(tiny, tokenizer_dir):
    calls = _count_calls(tiny.unet)
    rg_sample(tiny, SampleSettings(prompt="a dog", rg=0.0, cfg=5.0, steps=4, width=64, height=64), output_type="latent")
    pipe = build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir).pipeline()
    pipe_calls = _count_calls(pipe.unet)
    pipe(prompt="a dog", num_inference_steps=4, guidance_scale=5.0, width=64, height=64, output_type="latent")
    assert calls == pipe_calls == [2] * 4  # one batched (negative, prompt) call per step
    calls.clear()
    rg_sample(tiny, SampleSettings(prompt="a dog", rg=3.0, cfg=5.0, steps=4, width=64, height=64), output_type="latent")
    assert calls == [2, 1] * 4  # RG: (negative, base) batched with the LoRA off, then the token pass


def test_cfg_one_keeps_reward_guidance(tiny):
    tiny = _with_lora(tiny)
    s0 = SampleSettings(prompt="a dog", base_prompt="a toy", cfg=1.0, rg=0.0, steps=2, width=64, height=64)
    s3 = SampleSettings(prompt="a dog", base_prompt="a toy", cfg=1.0, rg=3.0, steps=2, width=64, height=64)
    a = rg_sample(tiny, s0, output_type="latent")
    b = rg_sample(tiny, s3, output_type="latent")
    assert (a - b).abs().max() > 1e-3  # at cfg 1 the RG term still acts (the reference dropped it)


@pytest.mark.parametrize("size", [(96, 64), (48, 80)])
def test_non_square_sizes_and_two_images(tiny, size):
    w, h = size
    images = rg_sample(tiny, SampleSettings(prompt="a dog", rg=3.0, steps=2, width=w, height=h, num_images=2,
                                            scheduler="euler_a"))
    assert [im.size for im in images] == [(w, h), (w, h)]


def test_a_vae_with_fewer_levels_samples_at_its_own_scale(tiny):
    from diffusers import AutoencoderKL

    from dco_train.tiny import VAE_CONFIG

    tiny.vae = AutoencoderKL(**dict(VAE_CONFIG, down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32)))
    latents = rg_sample(tiny, SampleSettings(prompt="a dog", steps=1, width=32, height=48), output_type="latent")
    assert latents.shape[-2:] == (24, 16)  # x2, not SDXL's x8
    assert [im.size for im in rg_sample(tiny, SampleSettings(prompt="a dog", steps=1, width=32, height=48))] == [(32, 48)]


def test_two_loras_merge_like_patched_weights(tiny, subject_dir, style_dir, tmp_path, tokenizer_dir):
    from dco_train.config import TrainConfig

    runs = []
    for cfg in (quick_config(data_dir=str(subject_dir), learning_rate=5e-2, text_encoder_lr=1e-2),
                TrainConfig.style(data_dir=str(style_dir), resolution=64, max_train_steps=4, rank=8, drift_every=0,
                                  checkpointing_steps=0, mixed_precision="no", learning_rate=5e-2)):
        runs.append(train(cfg, build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir),
                          RunOptions(output_dir=tmp_path / cfg.preset, progress_bar=False, log_with=None, save_precision="fp32")))
    merged = build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir)
    load_adapters(merged, [(runs[0].lora, 1.0), (runs[1].lora, 0.7)])
    patched = build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir)
    from dco_train.formats import load_lora

    names = {n.replace(".", "_"): n for n, _ in patched.unet.named_modules()}
    with torch.no_grad():
        for path, w in ((runs[0].lora, 1.0), (runs[1].lora, 0.7)):
            for key, m in load_lora(path).modules["unet"].items():
                layer = patched.unet.get_submodule(names[key[len("lora_unet_"):]])
                layer.weight += w * m.scale * (m.up.float() @ m.down.float())
    g = torch.Generator().manual_seed(0)
    x, c, p = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 128, generator=g), torch.randn(1, 64, generator=g)
    kw = dict(added_cond_kwargs={"text_embeds": p, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
    with torch.no_grad():
        ours, ref = merged.unet(x, 500, c, **kw).sample, patched.unet(x, 500, c, **kw).sample
        with lora_disabled(merged.unet):
            base = merged.unet(x, 500, c, **kw).sample
    assert (ours - base).abs().max() > 1e-3
    assert (ours - ref).abs().max().item() < 1e-5


def test_previews_are_emitted_and_do_not_change_training(subject_dir, tmp_path, tokenizer_dir):
    def run(out, previews):
        seen = []
        kw = dict(validation_prompts=["a <obj> on the beach"], validation_every=2, validation_steps=2) if previews else {}
        cfg = quick_config(data_dir=str(subject_dir), max_train_steps=4, learning_rate=1e-2, **kw)
        cb = Callbacks(on_preview=lambda step, images: seen.append((step, images)))
        res = train(cfg, build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir),
                    RunOptions(output_dir=out, progress_bar=False, log_with=None, save_precision="fp32", callbacks=cb))
        return res, seen

    with_p, seen = run(tmp_path / "a", True)
    without, _ = run(tmp_path / "b", False)
    assert [s for s, _ in seen] == [2, 4] and seen[0][1][0].size == (64, 64)
    from dco_train.formats import load_lora

    a, b = load_lora(with_p.lora).modules["unet"], load_lora(without.lora).modules["unet"]
    assert all(torch.equal(a[k].up, b[k].up) and torch.equal(a[k].down, b[k].down) for k in a)
    assert [h["loss"] for h in with_p.history] == [h["loss"] for h in without.history]
    assert with_p.components.unet.training  # train mode restored


@pytest.mark.parametrize("name", sorted(__import__("dco_train.sample", fromlist=["SCHEDULERS"]).SCHEDULERS))
def test_every_scheduler_the_cli_offers_samples_with_rg(tiny, name):
    import importlib.util

    from dco_train.errors import DCOError

    if name == "lms" and importlib.util.find_spec("scipy") is None:  # diffusers' LMS needs scipy
        with pytest.raises(DCOError, match="'lms' needs a library that is not installed.*scipy"):
            rg_sample(tiny, SampleSettings(prompt="a dog", steps=2, width=64, height=64, scheduler=name))
        return
    latents = rg_sample(tiny, SampleSettings(prompt="a dog", base_prompt="a toy", rg=3.0, steps=3, width=64, height=64,
                                             scheduler=name), output_type="latent")
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


def test_no_negative_prompt_means_zero_embeddings_like_diffusers(tiny, tokenizer_dir):
    s = SampleSettings(prompt="a dog", base_prompt="a toy", cfg=5.0, rg=3.0, width=64, height=64, num_images=2)
    ref = RGDenoiser(tiny, s).ref
    assert ref.embeds.shape[0] == 4 and not ref.embeds[:2].any() and not ref.pooled[:2].any()
    pipe = build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir).pipeline()
    _, neg, _, neg_pooled = pipe.encode_prompt("a dog", do_classifier_free_guidance=True)
    assert not neg.any() and not neg_pooled.any()  # diffusers' SDXL convention (force_zeros_for_empty_prompt)
    explicit = RGDenoiser(tiny, SampleSettings(prompt="a dog", negative_prompt="", cfg=5.0, rg=3.0, width=64, height=64)).ref
    assert explicit.embeds[:1].abs().max() > 0  # an explicit "" is encoded, as diffusers does
    zero = RGDenoiser(tiny, SampleSettings(prompt="a dog", cfg=5.0, rg=0.0, width=64, height=64)).conds
    assert not zero.embeds[:1].any() and zero.embeds[1:].abs().max() > 0


def test_rg_grid_shows_each_tile_amplified_difference_from_rg0_and_a_caption():
    import numpy as np
    from PIL import Image

    from dco_train.plot import difference_tiles, rg_comparison

    base = np.full((32, 32, 3), 100, np.uint8)
    moved = base.copy()
    moved[4:8, 4:8] += 2  # two pixel values apart: invisible side by side
    images = [Image.fromarray(base), Image.fromarray(base), Image.fromarray(moved)]
    tiles, gain = difference_tiles(images)
    assert gain == 255 / 2
    assert np.asarray(tiles[0]).max() == 0 and np.asarray(tiles[1]).max() == 0
    assert np.asarray(tiles[2])[5, 5].tolist() == [255, 255, 255] and np.asarray(tiles[2])[20, 20].max() == 0
    grid = rg_comparison(images, ["rg 0", "rg 1.5", "rg 3"], '"a <obj>" with the subject LoRA alone')
    assert grid.width == 96 and grid.height > 2 * 32  # caption, the images, the differences


def test_a_lora_with_matching_names_but_other_widths_is_refused_by_name(tiny, tmp_path):
    """A LoRA made for another model of the same layout: names match, widths do not."""
    from dco_train.errors import DCOError
    from dco_train.formats import save_lora
    from dco_train.lora import lora_state_dict

    other = build_tiny_sdxl(seed=1)
    add_lora(other.unet, 4, 4.0, UNET_TARGETS, seed=0)
    state = lora_state_dict(other.unet)
    name = next(k for k in state if "lora_A" in k and "attn1.to_q" in k)
    state[name] = torch.zeros(4, state[name].shape[1] + 3)  # the input width of another model
    path = save_lora(tmp_path / "other.safetensors", {"unet": state}, {"unet": 4.0})
    with pytest.raises(DCOError, match=r"other\.safetensors.*another model"):
        load_adapters(tiny, [(path, 1.0)])
