"""The memory budget: its tracker, the pre-flight refusal, what the trainer keeps, and the defaults."""

import math

import pytest
import torch
from helpers import quick_config

from dco_train import budget
from dco_train.config import TrainConfig
from dco_train.train import Callbacks, RunOptions, _Trainer, nan_loss_message, train, weight_dtype


def test_live_memory_counts_storages_until_their_last_view_dies():
    with budget.LiveMemory() as mem:
        a = torch.ones(1024)  # 4 KiB
        view = a[:10]
        b = a * 2  # another 4 KiB
        del a
        assert mem.now == 8192  # the view keeps a's storage alive
        del view
        assert mem.now == 4096
        del b
    assert mem.now == 0 and mem.peak == 8192


def test_preflight_refuses_what_does_not_fit_and_names_what_would():
    gib = budget.GIB
    alternatives = [("turn on gradient_checkpointing", int(9.6 * gib)), ("resolution 512", int(13 * gib))]
    assert budget.preflight_message(int(10 * gib), int(11.2 * gib), alternatives) is None
    msg = budget.preflight_message(int(14.1 * gib), int(11.2 * gib), alternatives)
    assert "~14.1 GiB" in msg and "11.2 GiB free" in msg
    assert "turn on gradient_checkpointing (~9.6 GiB)" in msg and "resolution 512" not in msg
    assert "no single change fits" in budget.preflight_message(int(20 * gib), gib, alternatives)


def test_sdxl_defaults_fit_12_gib_by_the_budget():
    assert TrainConfig().gradient_checkpointing
    for cfg in (TrainConfig.subject(tokens={"<dog>": "dog"}), TrainConfig.style()):
        est = budget.estimate(budget.settings_for(cfg, "bf16"), budget.SDXL_UNET, run=False)
        assert est is not None and est.peak <= 12 * budget.GIB, (cfg.preset, est.peak / budget.GIB)
    off = TrainConfig.style(gradient_checkpointing=False)
    assert budget.estimate(budget.settings_for(off, "bf16"), budget.SDXL_UNET, run=False).peak > 12 * budget.GIB


def test_fake_run_of_a_tiny_unet_agrees_with_its_real_peak(tiny):
    """The estimator on a real step, in process: the tracker on real tensors against the fake run."""
    from dco_train.lora import UNET_TARGETS, add_lora
    from dco_train.step import dco_errors
    from dco_train.text import PromptEmbeds

    s = budget.Settings(resolution=64, rank=4, checkpointing=False, dtype="fp32")
    est = budget.measure_step(s, unet_config=tiny.unet.config, flops=False)
    unet = tiny.unet.requires_grad_(False)
    params = add_lora(unet, 4, 4, UNET_TARGETS)
    unet.train()
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    emb = PromptEmbeds(torch.randn(1, 77, c.cross_attention_dim), torch.randn(1, pooled))
    x, target = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    with budget.LiveMemory() as mem:
        err, _ = dco_errors(unet, x, target=target, t=torch.tensor([10]), time_ids=torch.randn(1, 6), base=emb,
                            cond=lambda: emb, uses_reference=True)
        err.mean().backward()
    real = mem.peak - sum(p.numel() * 4 for p in params)
    assert real > 0 and abs(est.activations / real - 1) < 0.25


def test_training_reports_the_memory_estimate(tiny, subject_dir, tmp_path):
    seen = []
    train(quick_config(data_dir=str(subject_dir), max_train_steps=1), tiny,
          RunOptions(output_dir=tmp_path / "o", progress_bar=False, log_with=None, callbacks=Callbacks(on_status=seen.append)))
    line = next(s for s in seen if s.startswith("Memory estimate"))
    assert "GiB" in line
    assert seen.index(line) < seen.index("Training")


def _trainer(tiny, data_dir, tmp_path, **kw):
    cfg = quick_config(data_dir=str(data_dir), **kw)
    return _Trainer(cfg, tiny, RunOptions(output_dir=tmp_path / "o", progress_bar=False, log_with=None), None)


def test_frozen_weights_are_held_in_bf16_and_only_lora_and_ti_rows_in_fp32(tiny, subject_dir, tmp_path):
    assert weight_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert weight_dtype("no", torch.device("cpu")) == torch.float32
    tr = _trainer(tiny, subject_dir, tmp_path, mixed_precision="bf16")
    frozen = [p for m in (tiny.unet, *tiny.text_encoders) for p in m.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in tr.trainable)
    assert math.isfinite(tr._optimizer_step()["loss"])


@pytest.mark.parametrize("ti", [False, True], ids=["no_ti", "ti"])
def test_text_encoders_leave_the_device_without_ti_and_stay_with_it(tiny, request, tmp_path, ti):
    extra = dict(train_text_encoder_ti=True) if ti else dict(train_text_encoder_ti=False, tokens={})
    data_dir = request.getfixturevalue("subject_dir" if ti else "style_dir")
    tr = _trainer(tiny, data_dir, tmp_path, **extra)
    # without TI the step reads the cached embeddings, so the encoders wait in host memory
    assert tr.text_home == (tr.device if ti else torch.device("cpu")) and tr.needs_text_grad == ti
    assert all(next(e.parameters()).device == tr.text_home for e in tiny.text_encoders)


@pytest.mark.parametrize("checkpoints", [[], ["out/checkpoints/checkpoint-4"]])
def test_nan_loss_message_names_the_checkpoint_that_exists(checkpoints):
    from pathlib import Path

    msg = nan_loss_message(float("nan"), 5, [Path(c) for c in checkpoints])
    if checkpoints:
        assert "checkpoint-4" in msg and "is kept" in msg
    else:
        assert "No checkpoint" in msg and "is kept" not in msg


def test_resume_latest_without_a_checkpoint_says_it_starts_afresh(tiny, subject_dir, tmp_path):
    seen = []
    train(quick_config(data_dir=str(subject_dir), max_train_steps=1), tiny,
          RunOptions(output_dir=tmp_path / "o", progress_bar=False, log_with=None, resume="latest",
                     callbacks=Callbacks(on_status=seen.append)))
    assert any("starting afresh" in s for s in seen)
