"""Reward guidance over part of the schedule in the engine's sampler (rg_start / rg_end / outside)."""

import pytest
import torch

from dco_train.errors import DCOError
from dco_train.lora import lora_disabled
from dco_train.rg import window_timesteps
from dco_train.sample import RGDenoiser, SampleSettings, make_scheduler, rg_sample
from test_sample import _with_lora

KW = dict(prompt="a dog on the beach", base_prompt="a toy on the beach", negative_prompt="blurry", cfg=5.0, steps=6,
          width=64, height=64)


@pytest.fixture
def tiny_lora(tiny):
    return _with_lora(tiny)


def _calls(unet):
    calls = []
    unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    return calls


@pytest.mark.parametrize("rg", [3.0, 0.0])
@pytest.mark.parametrize("outside", ["ft", "base"])
def test_the_full_window_is_bit_identical_to_no_window(tiny_lora, rg, outside):
    plain = rg_sample(tiny_lora, SampleSettings(rg=rg, **KW), output_type="latent")
    full = rg_sample(tiny_lora, SampleSettings(rg=rg, rg_start=0.0, rg_end=1.0, outside=outside, **KW),
                     output_type="latent")
    assert torch.equal(plain, full)


def _by_hand(comps, rg_start, rg_end, outside):
    """The window written out: each step's prediction from a separate denoiser, RG inside,
    plain CFG (rg 0) of the fine-tuned model, or of the base model with the LoRA off, outside."""
    inside = RGDenoiser(comps, SampleSettings(rg=3.0, **KW))
    ft = RGDenoiser(comps, SampleSettings(rg=0.0, **KW))
    base = RGDenoiser(comps, SampleSettings(rg=0.0, **{**KW, "prompt": KW["base_prompt"]}))
    high, low = window_timesteps(rg_start, rg_end)
    scheduler = make_scheduler("euler", comps.scheduler.config)
    scheduler.set_timesteps(KW["steps"])
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    used = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            if low <= float(t) <= high:
                eps, what = inside(x, t), "rg"
            elif outside == "ft":
                eps, what = ft(x, t), "ft"
            else:
                with lora_disabled(comps.unet):
                    eps, what = base(x, t), "base"
            used.append(what)
            latents = scheduler.step(eps, t, latents).prev_sample
    return latents, used


@pytest.mark.parametrize("outside", ["ft", "base"])
def test_a_half_window_equals_the_steps_written_out_and_skips_the_token_pass(tiny_lora, outside):
    calls = _calls(tiny_lora.unet)
    ours = rg_sample(tiny_lora, SampleSettings(rg=3.0, rg_start=0.0, rg_end=0.5, outside=outside, **KW),
                     output_type="latent")
    per_step, calls[:] = list(calls), []
    ref, used = _by_hand(tiny_lora, 0.0, 0.5, outside)
    assert "rg" in used and outside in used
    assert per_step == [n for what in used for n in ([2, 1] if what == "rg" else [2])]
    assert (ours - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    full = rg_sample(tiny_lora, SampleSettings(rg=3.0, **KW), output_type="latent")
    assert (ours - full).abs().max().item() > 1e-3, "the window must change the result"


@pytest.mark.parametrize("kw, message", [
    (dict(rg_start=0.7, rg_end=0.2), r"rg_start \(0.7\) is after rg_end \(0.2\)"),
    (dict(rg_end=1.5), "rg_end must be a fraction of the schedule from 0 to 1"),
    (dict(outside="other"), "outside must be one of ft, base"),
])
def test_a_bad_window_is_refused_by_name(kw, message):
    with pytest.raises(DCOError, match=message):
        SampleSettings(**{**KW, **kw})
