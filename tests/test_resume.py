"""Exact resume: 2N steps straight == N steps, stop, resume to 2N (bitwise on CPU fp32)."""

import pytest
import torch

from helpers import quick_config
from dco_train.checkpoint import list_checkpoints, load_checkpoint
from dco_train.formats import load_embeddings, load_lora
from dco_train.tiny import build_tiny_sdxl
from dco_train.train import Callbacks, RunOptions, train

N = 3


def _cfg(subject_dir, **kw):
    return quick_config(data_dir=str(subject_dir), max_train_steps=2 * N, learning_rate=1e-2, text_encoder_lr=1e-2,
                        train_batch_size=2, gradient_accumulation_steps=2, random_flip=True, drift_every=2,
                        lr_scheduler="cosine", lr_warmup_steps=1, **kw)


def _run(out, subject_dir, tokenizer_dir, **run_kw):
    comps = build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir)
    return train(_cfg(subject_dir), comps, RunOptions(output_dir=out, progress_bar=False, log_with=None,
                                                      save_precision="fp32", **run_kw))


def _tensors(res):
    lora = {k: (m.down, m.up) for k, m in load_lora(res.lora).modules["unet"].items()}
    emb = load_embeddings(res.embeddings)
    return lora, emb


def test_stop_and_resume_equals_a_straight_run(subject_dir, tokenizer_dir, tmp_path):
    straight = _run(tmp_path / "a", subject_dir, tokenizer_dir)
    steps = []
    first = _run(tmp_path / "b", subject_dir, tokenizer_dir,
                 callbacks=Callbacks(on_step=lambda i: steps.append(i.step), should_stop=lambda: len(steps) >= N))
    assert first.stopped and first.step == N and first.lora is None
    assert [p.name for p in list_checkpoints(tmp_path / "b/checkpoints")] == [f"checkpoint-{N}"]
    resumed = _run(tmp_path / "b", subject_dir, tokenizer_dir, resume="latest")
    assert resumed.step == 2 * N and not resumed.stopped
    (la, ea), (lb, eb) = _tensors(straight), _tensors(resumed)
    assert la.keys() == lb.keys()
    for k in la:
        assert torch.equal(la[k][0], lb[k][0]) and torch.equal(la[k][1], lb[k][1]), k
    assert torch.equal(ea.clip_l, eb.clip_l) and torch.equal(ea.clip_g, eb.clip_g)
    assert any(u.abs().max() > 0 for _, u in la.values())
    # the log of the resumed run continues the first one and matches the straight run
    assert [h["step"] for h in resumed.history if "loss" in h] == list(range(1, 2 * N + 1))
    assert [h["loss"] for h in resumed.history if "loss" in h] == [h["loss"] for h in straight.history if "loss" in h]


def test_checkpoint_holds_everything_and_is_pruned(subject_dir, tokenizer_dir, tmp_path):
    comps = build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir)
    cfg = quick_config(data_dir=str(subject_dir), max_train_steps=5, checkpointing_steps=1, checkpoints_total_limit=2)
    res = train(cfg, comps, RunOptions(output_dir=tmp_path, progress_bar=False, log_with=None))
    assert [p.name for p in res.checkpoints] == ["checkpoint-3", "checkpoint-4"]
    ck = load_checkpoint(res.checkpoints[-1])
    assert ck.step == 4 and ck.embeddings is not None and ck.embeddings.tokens == ["<obj>"]
    assert ck.optimizer["state"] and ck.lr_scheduler["last_epoch"] == 4
    assert ck.data_order["position"] >= 1 and len(ck.rng) == 1
    assert set(ck.lora) == {"unet"} and all(v.dtype == torch.float32 for v in ck.lora["unet"].values())
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp folders


def test_resume_with_other_settings_is_refused(subject_dir, tokenizer_dir, tmp_path):
    from dco_train.errors import DCOError

    comps = build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir)
    cfg = quick_config(data_dir=str(subject_dir), max_train_steps=2, checkpointing_steps=1)
    train(cfg, comps, RunOptions(output_dir=tmp_path, progress_bar=False, log_with=None))
    other = quick_config(data_dir=str(subject_dir), max_train_steps=4, rank=8)
    with pytest.raises(DCOError, match="different settings \\(rank\\)"):
        train(other, build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir),
              RunOptions(output_dir=tmp_path, progress_bar=False, log_with=None, resume="latest"))
