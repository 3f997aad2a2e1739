"""The loop: batch sizes, accumulation, plain-loss baseline, monitors, logs."""

import json
import math

import pytest
import torch

from helpers import quick_config
from dco_train.config import TrainConfig
from dco_train.formats import load_lora
from dco_train.train import Callbacks, RunOptions, train


def _run(tiny, tmp_path, **kw):
    opts = dict(output_dir=tmp_path / "out", progress_bar=False, log_with=None)
    opts.update(kw.pop("run", {}))
    return train(quick_config(**kw), tiny, RunOptions(**opts))


@pytest.mark.parametrize("ti", [True, False], ids=["ti", "no_ti"])
def test_batch_size_two(tiny, subject_dir, tmp_path, ti):
    extra = {} if ti else dict(train_text_encoder_ti=False, tokens={})
    res = _run(tiny, tmp_path, data_dir=str(subject_dir), train_batch_size=2, max_train_steps=2, learning_rate=1e-2, **extra)
    assert len(res.history) == 2 and all(math.isfinite(h["loss"]) for h in res.history)
    up = [m.up for m in load_lora(res.lora).modules["unet"].values()]
    assert any(u.abs().max() > 0 for u in up), "the LoRA did not train"
    assert (res.embeddings is not None) == ti


def test_plain_loss_baseline_skips_the_reference(tiny, subject_dir, tmp_path):
    calls, at_step = [], []
    handle = tiny.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    res = _run(tiny, tmp_path, data_dir=str(subject_dir), dco_beta=0.0, max_train_steps=2,
               run=dict(callbacks=Callbacks(on_step=lambda info: at_step.append(len(calls)))))
    handle.remove()
    assert at_step == [1, 2]  # one UNet pass per step: no LoRA-off reference pass (the final per-image score follows)
    assert all("err_ref" not in h and "reward_gap" not in h for h in res.history)


def test_gradient_accumulation_on_the_style_preset(tiny, style_dir, tmp_path):
    cfg = TrainConfig.style(data_dir=str(style_dir), resolution=64, max_train_steps=2, gradient_accumulation_steps=2,
                            checkpointing_steps=0, drift_every=0, mixed_precision="no", rank=4, snr_gamma=5.0)
    res = train(cfg, tiny, RunOptions(output_dir=tmp_path / "o", progress_bar=False, log_with=None))
    assert res.embeddings is None and len(res.history) == 2
    assert res.history[-1]["err_ref"] is not None


def test_drift_is_zero_at_step_zero_and_positive_after_training(tiny, subject_dir, tmp_path):
    baseline, stepped = [], []
    cb = Callbacks(on_metrics=baseline.append, on_step=lambda info: stepped.append(info.drift))
    res = _run(tiny, tmp_path, data_dir=str(subject_dir), drift_every=3, max_train_steps=6, learning_rate=1e-2,
               run=dict(callbacks=cb))
    drift = [h for h in res.history if "drift" in h]
    assert baseline == drift[:1]  # the step-0 reading reaches the callbacks too (the ComfyUI chart)
    assert [d is not None for d in stepped] == [False, False, True, False, False, True]
    assert [h["step"] for h in drift] == [0, 3, 6]
    assert drift[0]["drift"] == 0.0
    assert drift[-1]["drift"] > 0 and all(h["fit"] > 0 for h in drift)
    assert all(h["drift_s"] > 0 for h in drift[1:])  # the meter reports what it cost
    rows = [json.loads(line) for line in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert rows == res.history


def test_callbacks_report_every_step_and_stop_saves_a_checkpoint(tiny, subject_dir, tmp_path):
    seen = []
    cb = Callbacks(on_step=lambda info: seen.append(info.step), should_stop=lambda: len(seen) >= 2)
    res = _run(tiny, tmp_path, data_dir=str(subject_dir), max_train_steps=10, run=dict(callbacks=cb))
    assert seen == [1, 2] and res.stopped and res.step == 2
    assert [p.name for p in res.checkpoints] == ["checkpoint-2"]
    assert res.lora is None  # an unfinished run writes no final LoRA; its checkpoint resumes it


def test_gradient_checkpointing_gives_the_same_run(tokenizer_dir, subject_dir, tmp_path):
    from dco_train.tiny import build_tiny_sdxl

    runs = []
    for gc in (False, True):
        cfg = quick_config(data_dir=str(subject_dir), max_train_steps=3, learning_rate=1e-2, gradient_checkpointing=gc)
        runs.append(train(cfg, build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir),
                          RunOptions(output_dir=tmp_path / str(gc), progress_bar=False, log_with=None)))
    assert runs[1].components.unet.is_gradient_checkpointing
    a, b = [h["loss"] for h in runs[0].history], [h["loss"] for h in runs[1].history]
    assert a == pytest.approx(b, rel=1e-4)  # recomputation changes nothing but float rounding


def test_buckets_batch_images_of_one_shape(tiny, tmp_path):
    from helpers import write_images

    data = tmp_path / "mixed"
    write_images(data, ["a wide <obj>", "another wide <obj>"], size=(256, 128))
    write_images(tmp_path / "tall", ["a tall <obj>", "another tall <obj>"], size=(128, 256))
    for i, p in enumerate(sorted((tmp_path / "tall").iterdir())):
        p.rename(data / f"tall_{p.name}")
    shapes, trained = [], []  # the training steps' shapes (the final per-image score batches its timesteps)
    tiny.unet.register_forward_pre_hook(lambda m, a: None if len(trained) == 4 else shapes.append(tuple(a[0].shape)))
    res = _run(tiny, tmp_path, data_dir=str(data), buckets=True, resolution=128, train_batch_size=2, max_train_steps=4,
               run=dict(callbacks=Callbacks(on_step=trained.append)))
    assert len(res.history) == 4
    wide = {s for s in shapes if s[-1] > s[-2]}
    tall = {s for s in shapes if s[-1] < s[-2]}
    assert wide and tall and all(s[0] == 2 for s in shapes)  # both buckets trained, never mixed in a batch


def test_reference_pass_gets_the_base_prompt_and_the_lora_pass_the_token_prompt(tiny, subject_dir, tmp_path):
    from dco_train.train import _Trainer

    # TI: "<obj>" in the prompt, "toy" in the base; the rows start as "toy", so the prompts differ after a step
    cfg = quick_config(data_dir=str(subject_dir), max_train_steps=2, text_encoder_lr=1e-1)
    tr = _Trainer(cfg, tiny, RunOptions(output_dir=tmp_path / "o", progress_bar=False, log_with=None), None)
    tr._optimizer_step()
    seen = []
    handle = tiny.unet.register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    tr._optimizer_step()
    handle.remove()
    item = tr.data.items[0]
    assert item.prompt != item.base_prompt  # "<obj>" against "toy": the step where they differ
    bases = [tr.cache[it.base_prompt].embeds for it in tr.data.items]
    assert len(seen) == 2  # the reference pass first, then the LoRA pass on the token prompt (TI rows spliced in)
    assert any(torch.equal(seen[0], b) for b in bases)
    assert not any(torch.allclose(seen[1], b) for b in bases)


def _first_step(tokenizer_dir, tmp_path, name: str, **overrides):
    """One micro-step of a fresh style trainer on a fixed latent (no VAE draw, no flip): the UNet's
    first input (x_t, t), the loss and its stats. Same seed, so runs differ only by `overrides`."""
    from dco_train.data import latents_from_tensors
    from dco_train.tiny import build_tiny_sdxl
    from dco_train.train import _Trainer

    comps = build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir)
    x0 = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(3))
    data = latents_from_tensors([x0], ["a house"], ["a house"], [torch.tensor([64.0, 64, 0, 0, 64, 64])])
    cfg = TrainConfig.style(**{**dict(resolution=64, max_train_steps=2, checkpointing_steps=0, drift_every=0,
                                      mixed_precision="no", rank=4, random_flip=False), **overrides})
    tr = _Trainer(cfg, comps, RunOptions(output_dir=tmp_path / name, progress_bar=False, log_with=None), data)
    seen = []
    comps.unet.register_forward_pre_hook(lambda m, a: seen.append((a[0].detach().clone(), a[1].detach().clone())))
    loss, stats = tr._micro_step([0])
    x_t, t = seen[0]
    return x0, x_t, t, tr.noise_scheduler.alphas_cumprod[t].float(), loss, stats


def test_offset_noise_adds_a_per_channel_constant_scaled_by_the_setting(tokenizer_dir, tmp_path):
    """The noise the trainer draws, recovered from x_t = √ᾱ x0 + √(1-ᾱ) ε: with offset noise it is the
    plain noise plus `offset_noise` × one value per sample and channel, constant over the image."""
    eps = {}
    for strength in (0.0, 0.1, 0.2):
        x0, x_t, t, ab, _, _ = _first_step(tokenizer_dir, tmp_path, f"o{strength}", offset_noise=strength)
        eps[strength] = (x_t[0] - ab.sqrt() * x0) / (1 - ab).sqrt()
    d1, d2 = eps[0.1] - eps[0.0], eps[0.2] - eps[0.0]
    per_channel = d1.mean(dim=(-2, -1), keepdim=True)
    assert per_channel.abs().min() > 1e-3, "offset_noise=0.1 left the noise unchanged"
    torch.testing.assert_close(d1, per_channel.expand_as(d1), atol=1e-3, rtol=0)  # an offset, not fresh noise
    torch.testing.assert_close(d2, 2 * d1, atol=2e-3, rtol=0)  # in proportion to the setting


def test_min_snr_weights_both_errors_by_min_snr_gamma_over_snr(tokenizer_dir, tmp_path):
    """Same seed, same x_t and t; with snr_gamma both errors are scaled by min(SNR, γ)/SNR, computed
    here by hand from the schedule (γ below every SNR of the schedule, so the weight is never 1)."""
    gamma = 1e-3
    _, x_a, t_a, ab, _, plain = _first_step(tokenizer_dir, tmp_path, "plain")
    _, x_b, t_b, _, loss, weighted = _first_step(tokenizer_dir, tmp_path, "snr", snr_gamma=gamma)
    assert torch.equal(x_a, x_b) and torch.equal(t_a, t_b)
    snr = ab / (1 - ab)
    weight = float(min(snr, torch.tensor(gamma)) / snr)
    assert weight < 0.5
    assert weighted.err_model == pytest.approx(weight * plain.err_model, rel=1e-5)
    assert weighted.err_ref == pytest.approx(weight * plain.err_ref, rel=1e-5)
    beta = TrainConfig.style().dco_beta
    expected = -torch.nn.functional.logsigmoid(torch.tensor(-beta * (weighted.err_model - weighted.err_ref)))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4, abs=1e-6)
