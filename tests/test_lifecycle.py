"""A run's life cycle in the engine: its phases, Cancel in each of them, the preview's cost, the
final per-image errors, and checkpoints whose optimizer state is empty."""

import json

import pytest
import torch

from helpers import quick_config
from dco_train.checkpoint import CheckpointState, load_checkpoint, save_checkpoint
from dco_train.monitor import CACHING, LOADING, PHASES, PREPARING, PREVIEW, SAVING, TRAINING
from dco_train.train import Callbacks, RunOptions, train

PREVIEWS = dict(validation_prompts=["a <obj> on the beach"], validation_every=1, validation_steps=2)


def _run(tiny, subject_dir, out, callbacks, **kw):
    cfg = quick_config(data_dir=str(subject_dir), **{"max_train_steps": 2, **kw})
    return train(cfg, tiny, RunOptions(output_dir=out, progress_bar=False, log_with=None, callbacks=callbacks))


def _final_files(out):
    return sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json", ".staged")) \
        if out.is_dir() else []


def test_a_run_reports_every_phase_in_order_and_the_per_image_errors(tiny, subject_dir, tmp_path):
    phases, metrics = [], []
    cb = Callbacks(on_phase=lambda *p: phases.append(p), on_metrics=metrics.append, on_preview=lambda s, im: None)
    res = _run(tiny, subject_dir, tmp_path / "o", cb, learning_rate=1e-2, **PREVIEWS)
    order = [label for i, (label, _, _) in enumerate(phases) if i == 0 or phases[i - 1][0] != label]
    assert order[:4] == [PREPARING, LOADING, CACHING, TRAINING] and set(order) == set(PHASES)
    assert order[-1] == SAVING and phases[-1][1] == phases[-1][2]  # the save is the last unit, and complete
    assert (PREPARING, 3, 3) in phases and (PREVIEW, 2, 2) in phases
    # each preview's cost, priced in training steps
    costs = [m for m in metrics if "preview_s" in m]
    assert [m["step"] for m in costs] == [1, 2] and all(m["preview_s"] > 0 and m["preview_steps_equiv"] > 0 for m in costs)
    # one row per image, LoRA on and off, also in the run folder
    assert [r["name"] for r in res.per_image] == ["img0.png", "img1.png", "img2.png"]
    assert all(r["err_lora"] > 0 and r["err_base"] > 0 and r["err_lora"] != r["err_base"] for r in res.per_image)
    assert json.loads((tmp_path / "o/per_image.json").read_text()) == res.per_image
    assert res.warnings == []


def test_per_image_errors_are_deterministic_and_the_base_error_ignores_the_lora(tiny, subject_dir, tmp_path,
                                                                               tokenizer_dir):
    from dco_train.tiny import build_tiny_sdxl

    a = _run(tiny, subject_dir, tmp_path / "a", Callbacks(), learning_rate=1e-2)
    b = _run(build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir), subject_dir, tmp_path / "b", Callbacks(),
             learning_rate=1e-3)
    assert [r["err_base"] for r in a.per_image] == [r["err_base"] for r in b.per_image]  # LoRA off: the base model
    assert [r["err_lora"] for r in a.per_image] != [r["err_lora"] for r in b.per_image]


@pytest.mark.parametrize("phase", [PREPARING, LOADING, CACHING, TRAINING, PREVIEW, SAVING])
def test_cancel_in_each_phase_stops_and_writes_no_final_file(tiny, subject_dir, tmp_path, phase):
    """Cancel asked for during `phase` of a one-step run: a stopped result, no LoRA, embeddings or
    per_image.json; a checkpoint only where a step had completed."""
    asked = []

    def on_phase(label, done, total):
        if label == phase and not asked:
            asked.append((label, done, total))

    out = tmp_path / "o"
    cb = Callbacks(on_phase=on_phase, should_stop=lambda: bool(asked), on_preview=lambda s, im: None)
    res = _run(tiny, subject_dir, out, cb, max_train_steps=1, **PREVIEWS)
    assert asked and res.stopped and res.lora is None and res.embeddings is None
    assert _final_files(out) == []
    stepped = phase in (TRAINING, PREVIEW, SAVING)
    assert res.step == (1 if stepped else 0)
    assert [p.name for p in res.checkpoints] == (["checkpoint-1"] if stepped else [])
    if phase == PREVIEW:
        assert res.history[-1].get("preview_s") is None  # the preview ended at its first step


def test_cancel_during_the_final_save_keeps_the_earlier_files(tiny, subject_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"earlier run")
    asked = []
    cb = Callbacks(on_phase=lambda label, d, t: asked.append(1) if label == SAVING and d == t - 1 else None,
                   should_stop=lambda: bool(asked))
    res = _run(tiny, subject_dir, out, cb, max_train_steps=1)
    assert res.stopped and res.lora is None
    assert (out / "lora.safetensors").read_bytes() == b"earlier run" and not list(out.glob(".*staged"))


def _state(optimizer):
    return CheckpointState(step=0, lora={"unet": {"a": torch.ones(2)}}, optimizer=optimizer, lr_scheduler={},
                           data_order={}, rng=[torch.Generator().get_state()], config={})


@pytest.mark.parametrize("state", [{}, {0: {"step": torch.tensor(1.0), "exp_avg": torch.empty(0)}}],
                         ids=["empty_state", "empty_tensor"])
def test_checkpoint_with_an_empty_optimizer_state_reads_back(tmp_path, state):
    optimizer = {"state": state, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    back = load_checkpoint(save_checkpoint(tmp_path / "checkpoint-0", _state(optimizer))).optimizer
    assert back["param_groups"] == optimizer["param_groups"] and back["state"].keys() == state.keys()
    for pid, entries in state.items():
        assert all(torch.equal(back["state"][pid][k], v) for k, v in entries.items())


def test_a_checkpoint_before_the_first_step_resumes(tiny, subject_dir, tmp_path, tokenizer_dir):
    """Cancel at the first Training report of a run: its optimizer has no state yet."""
    from dco_train.tiny import build_tiny_sdxl

    from dco_train.train import _Trainer

    cfg = quick_config(data_dir=str(subject_dir), max_train_steps=2)
    tr = _Trainer(cfg, tiny, RunOptions(output_dir=tmp_path / "o", progress_bar=False, log_with=None), None)
    path = tr.save_checkpoint()
    assert tr.optimizer.optimizer.state_dict()["state"] == {}
    res = train(cfg, build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir),
                RunOptions(output_dir=tmp_path / "o", progress_bar=False, log_with=None, resume=str(path)))
    assert res.step == 2 and res.lora is not None
