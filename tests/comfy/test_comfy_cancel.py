"""The DCOTrainer node's life cycle on genuine (tiny) ComfyUI objects: every phase is shown (events
and progress bar), and Cancel, pressed in any phase, ends the run as interrupted with no final file.

Cancel is pressed the way ComfyUI's Cancel button does it: `interrupt_current_processing(True)`,
here from the node's own event of the chosen phase.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import harness

harness.require()

trainer = harness.pack_module("nodes.trainer")
monitor = harness.pack_module("dco_train.monitor")

CAPTIONS = ["a photo of a <obj> on a table", "a close up photo of a <obj> in the snow", "a photo of a <obj> on the beach"]


def write_dataset(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(CAPTIONS):
        Image.new("RGB", (72, 64), (60 * i, 120, 200)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption, encoding="utf-8")
    return folder


def node_inputs(dataset: Path, **overrides):
    base = dict(dataset_dir=str(dataset), config_name="", preset="subject", tokens="<obj>=toy", output_name="run",
                overwrite=False, steps=1, rank=4, learning_rate=1e-2, text_encoder_lr=1e-2, beta=1000.0, resolution=64,
                batch_size=1, offset_noise=-1.0, seed=0, mixed_precision="no", gradient_checkpointing=False,
                use_8bit_adam=False, checkpoint_every=0, resume="off", validation_prompt="a <obj> on the beach",
                validation_every=1)
    base.update(overrides)
    return base


def run_node(**inputs):
    import torch

    with torch.inference_mode():
        model, clip, vae = harness.build_tiny_sdxl(seed=0)
        return harness.call_node(trainer.DCOTrainer, model=model, clip=clip, vae=vae, **inputs)


def record_events(monkeypatch, on_event=None) -> list[dict]:
    seen, send = [], trainer.events.send

    def spy(event, data):
        if event == trainer.events.TRAIN:
            seen.append(dict(data))
            if on_event:
                on_event(data)
        send(event, data)

    monkeypatch.setattr(trainer.events, "send", spy)
    return seen


def final_files(folders) -> list[str]:
    found = [p.name for kind in ("loras", "embeddings") for p in folders[kind].iterdir()]
    run_dir = folders["output"] / "dco/run"
    if run_dir.is_dir():
        found += [p.name for p in run_dir.iterdir() if p.is_file() and p.suffix != ".jsonl"]
    return found


def test_every_phase_is_shown_and_the_done_event_carries_the_per_image_errors(folders, monkeypatch):
    import comfy.utils

    events = record_events(monkeypatch)
    bar = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: bar.append((len(events), v, t)))
    try:
        run_node(**node_inputs(write_dataset(folders["root"] / "d")))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    setup = [e for e in events if e["status"] == "setup"]
    assert {e["phase"] for e in setup} == set(monitor.PHASES)
    assert all(isinstance(e["done"], int) and isinstance(e["total"], int) and e["done"] <= e["total"] for e in setup)
    assert {"phase": "Preparing data", "done": 3, "total": 3} in [{k: e[k] for k in ("phase", "done", "total")}
                                                                  for e in setup]
    first_step = next(i for i, e in enumerate(events) if e["status"] == "running" and "loss" in e)
    assert any(i < first_step for i, _, _ in bar)  # the progress bar moves during set-up too
    cost = [e for e in events if "preview_s" in e and "loss" not in e]
    assert cost and cost[0]["status"] == "running" and cost[0]["step"] == 1 and cost[0]["preview_steps_equiv"] > 0
    done = events[-1]
    assert done["status"] == "done" and done["warnings"] == []
    assert [r["name"] for r in done["per_image"]] == ["img0.png", "img1.png", "img2.png"]
    assert all(r["err_lora"] > 0 and r["err_base"] > 0 for r in done["per_image"])
    assert (folders["output"] / "dco/run/per_image.json").is_file()


@pytest.mark.parametrize("phase", ["Preparing data", "Loading models", "Caching prompt embeddings", "Training",
                                   "Rendering preview", "Saving"])
def test_cancel_in_each_phase_interrupts_and_writes_no_final_file(folders, monkeypatch, phase):
    import comfy.model_management as mm

    def press_cancel(data):
        if data.get("status") == "setup" and data.get("phase") == phase:
            mm.interrupt_current_processing(True)

    events = record_events(monkeypatch, press_cancel)
    with pytest.raises(mm.InterruptProcessingException):
        run_node(**node_inputs(write_dataset(folders["root"] / "d")))
    assert not mm.processing_interrupted()  # ComfyUI's flag is consumed, as its executor expects
    statuses = [e["status"] for e in events]
    assert statuses[-1] == "interrupted" and "done" not in statuses
    assert final_files(folders) == []
    checkpoints = folders["output"] / "dco/run/checkpoints"
    stepped = phase in ("Training", "Rendering preview", "Saving")  # a step had completed: it can resume
    assert (checkpoints / "checkpoint-1").is_dir() == stepped
