"""The DCOTrainer node on genuine (tiny) ComfyUI MODEL / CLIP / VAE objects.

Node calls run inside `torch.inference_mode()` as ComfyUI's executor runs them, with temporary
loras / embeddings / output folders, so nothing in the ComfyUI checkout is touched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import harness

harness.require()

import torch  # noqa: E402

convert = harness.pack_module("nodes.convert")
trainer = harness.pack_module("nodes.trainer")
engine_text = harness.pack_module("dco_train.text")
engine_errors = harness.pack_module("dco_train.errors")
formats = harness.pack_module("dco_train.formats")
DCOError = engine_errors.DCOError

CAPTIONS = ["a photo of a <obj> on a table", "a close up photo of a <obj> in the snow", "a photo of a <obj> on the beach"]


def write_dataset(folder: Path, captions: list[str], size=(80, 64)) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        im = Image.new("RGB", size, (40 * i % 255, 120, 200))
        ImageDraw.Draw(im).ellipse((8 + 4 * i, 8, size[0] // 2 + 8, size[1] - 8), fill=(230, 40, 40))
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption, encoding="utf-8")
    return folder


def node_inputs(dataset: Path, **overrides):
    base = dict(dataset_dir=str(dataset), config_name="", preset="subject", tokens="<obj>=toy",
                output_name="dco_test", overwrite=False, steps=4, rank=4, learning_rate=1e-2, text_encoder_lr=1e-2,
                beta=1000.0, resolution=64, batch_size=1, offset_noise=-1.0, seed=0, mixed_precision="no",
                gradient_checkpointing=False, use_8bit_adam=False, checkpoint_every=0, resume="off",
                validation_prompt="", validation_every=0)
    base.update(overrides)
    return base


def graph_models(seed: int = 0):
    """The tiny MODEL/CLIP/VAE built under inference mode, as ComfyUI's loaders build theirs
    (their weights are then inference tensors, which training must cope with)."""
    with torch.inference_mode():
        return harness.build_tiny_sdxl(seed=seed)


def run_node(model, clip, vae, **inputs):
    with torch.inference_mode():  # what ComfyUI's executor does around every node
        return harness.call_node(trainer.DCOTrainer, model=model, clip=clip, vae=vae, **inputs)


# ------------------------------------------------------------------------------- conversion
def test_unet_conversion_matches_comfyui():
    with torch.inference_mode():
        model = harness.build_model(seed=3)
    unet = convert.unet_from_model(model, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 6, generator=g), torch.randn(2, 77, harness.HIDDEN_L + harness.HIDDEN_G, generator=g)
    pooled, t = torch.randn(2, harness.HIDDEN_G, generator=g), torch.tensor([120.0, 870.0])
    h, w, ch, cw = 48.0, 64.0, 8.0, 0.0  # non-square with a crop, so the time-id order is tested
    with torch.no_grad():
        y = model.model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=cw, crop_h=ch, target_width=w,
                                   target_height=h)
        ours = unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.tensor([[h, w, ch, cw, h, w]] * 2)}).sample
        comfy_eps = model.model.diffusion_model(x, timesteps=t, context=ctx, y=y)
    assert (ours - comfy_eps).abs().max().item() < 1e-5  # same weights, float32 rounding only


def test_text_encoder_conversion_matches_comfyui():
    with torch.inference_mode():
        clip = harness.build_clip(seed=4)
    te, te2, tok, tok2 = convert.text_encoders_from_clip(clip, torch.device("cpu"))
    text = "a photo of a dog on the beach"
    with torch.no_grad():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        ours = engine_text.encode_prompts([tok, tok2], [te, te2], [text])
    assert (ours.embeds - cond).abs().max().item() < 1e-5
    assert (ours.pooled - pooled).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------- end to end
def _hashes(model, clip):
    return harness.model_hash(model), harness.model_hash(clip.cond_stage_model)


def test_trains_subject_and_style_and_leaves_the_graph_model_alone(folders, caplog):
    model, clip, vae = graph_models()
    before = _hashes(model, clip)
    data = write_dataset(folders["root"] / "subject", CAPTIONS)
    with caplog.at_level(logging.WARNING):
        new_model, new_clip, lora_name, emb_name, curve = run_node(model, clip, vae, **node_inputs(data))
    assert lora_name == "dco_test.safetensors" and emb_name == "dco_test.safetensors"
    assert (folders["loras"] / lora_name).is_file() and (folders["embeddings"] / emb_name).is_file()
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(new_model.patches) == 4 * 2 * 4 and not model.patches  # every attention projection, on a clone
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    assert _hashes(model, clip) == before
    # the returned CLIP knows the token; the input CLIP does not
    def has_row(c):
        return any(torch.is_tensor(tok) for tok, *_ in c.tokenize("a <obj>")["l"][0])

    assert has_row(new_clip) and not has_row(clip)
    style = write_dataset(folders["root"] / "style", ["a house in flat cartoon illustration style"], size=(64, 64))
    m2, c2, lora2, emb2, _ = run_node(model, clip, vae, **node_inputs(style, preset="style", tokens="", output_name="style"))
    assert lora2 == "style.safetensors" and emb2 == ""
    assert _hashes(model, clip) == before
    # the trained MODEL samples through the RG guider
    guider = harness.pack_module("nodes.guider")
    pos_tok, pos_base, neg = harness.encode(new_clip, "a <obj>"), harness.encode(clip, "a toy"), harness.encode(clip, "")
    with torch.inference_mode():
        latent = harness.call_node(guider.DCORewardGuidanceSampler, model=model, model_ft=new_model, positive_token=pos_tok,
                                   positive_base=pos_base, negative=neg, latent_image={"samples": torch.zeros(1, 4, 8, 8)},
                                   seed=1, steps=2, cfg=5.0, rg=3.0, sampler_name="euler", scheduler="normal", denoise=1.0)[0]
    assert torch.isfinite(latent["samples"]).all()
    assert _hashes(model, clip) == before


def _steps_seen(monkeypatch) -> list[int]:
    """The training steps the node has reported (its `running` events with a loss), as they come."""
    steps, send = [], trainer.events.send

    def spy(event, data):
        if data.get("status") == "running" and "loss" in data:
            steps.append(data["step"])
        send(event, data)

    monkeypatch.setattr(trainer.events, "send", spy)
    return steps


def _interrupt_at(step: int, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    steps = _steps_seen(monkeypatch)

    def hook(value, total, preview, node_id=None):
        if steps and steps[-1] >= step:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()  # what ComfyUI's own progress hook does

    comfy.utils.set_progress_bar_global_hook(hook)


def test_cancel_then_resume_equals_an_uninterrupted_run(folders, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    model, clip, vae = graph_models()
    data = write_dataset(folders["root"] / "subject", CAPTIONS)
    run_node(model, clip, vae, **node_inputs(data, steps=6, output_name="straight"))
    _interrupt_at(3, monkeypatch)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_node(model, clip, vae, **node_inputs(data, steps=6, output_name="resumed"))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert not mm.processing_interrupted()
    assert (folders["output"] / "dco/resumed/checkpoints/checkpoint-3").is_dir()
    assert not (folders["loras"] / "resumed.safetensors").exists()
    with pytest.raises(DCOError, match="set resume to latest"):
        run_node(model, clip, vae, **node_inputs(data, steps=6, output_name="resumed"))
    run_node(model, clip, vae, **node_inputs(data, steps=6, output_name="resumed", resume="latest"))
    a, b = formats.load_lora(folders["loras"] / "straight.safetensors"), formats.load_lora(folders["loras"] / "resumed.safetensors")
    for k, m in a.modules["unet"].items():
        assert torch.equal(m.up, b.modules["unet"][k].up) and torch.equal(m.down, b.modules["unet"][k].down), k
    ea = formats.load_embeddings(folders["embeddings"] / "straight.safetensors")
    eb = formats.load_embeddings(folders["embeddings"] / "resumed.safetensors")
    assert torch.equal(ea.clip_l, eb.clip_l) and torch.equal(ea.clip_g, eb.clip_g)


def test_exception_inside_the_loop_leaves_the_model_alone(folders, monkeypatch):
    import comfy.utils

    model, clip, vae = graph_models()
    before = _hashes(model, clip)
    data = write_dataset(folders["root"] / "subject", CAPTIONS)
    steps = _steps_seen(monkeypatch)

    def boom(value, total, preview, node_id=None):
        if steps and steps[-1] >= 2:
            raise RuntimeError("disk on fire")

    comfy.utils.set_progress_bar_global_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="disk on fire"):
            run_node(model, clip, vae, **node_inputs(data))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert _hashes(model, clip) == before
    assert not list(folders["loras"].iterdir())


def _sd15_model():
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = harness.unet_config("tiny")
    config.update(num_classes=None, adm_in_channels=None, context_dim=64)
    mc = comfy.supported_models.SD15(config)
    mc.unet_config["num_head_channels"] = 16
    mc.set_inference_dtype(torch.float32, None)
    return comfy.model_patcher.ModelPatcher(mc.get_model({}, ""), load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


@pytest.mark.parametrize("case,message", [
    ("missing_dir", "does not exist"),
    ("unreadable", r"Cannot read the image .*img1\.png"),
    ("no_token", r"img1\.png .* does not contain <obj>"),
    ("escape", r"'\.\./evil' may not contain '\.\.'"),
    ("absolute", "not an absolute path"),
    ("not_sdxl", "not an SDXL model"),
])
def test_bad_inputs_give_clear_errors_and_write_nothing(folders, case, message):
    model, clip, vae = graph_models()
    data = write_dataset(folders["root"] / "subject", CAPTIONS)
    inputs = node_inputs(data)
    if case == "missing_dir":
        inputs["dataset_dir"] = str(folders["root"] / "nowhere")
    elif case == "unreadable":
        (data / "img1.png").write_bytes(b"not an image")
    elif case == "no_token":
        (data / "img1.txt").write_text("a photo of a toy")
    elif case == "escape":
        inputs["output_name"] = "../evil"
    elif case == "absolute":
        inputs["output_name"] = str(folders["root"] / "evil")
    elif case == "not_sdxl":
        model = _sd15_model()
    with pytest.raises(DCOError, match=message):
        run_node(model, clip, vae, **inputs)
    assert not list(folders["loras"].iterdir()) and not list(folders["embeddings"].iterdir())
    assert not (folders["output"] / "dco").exists() or not any((folders["output"] / "dco").rglob("*.safetensors"))
    assert not (folders["root"] / "evil.safetensors").exists()


def test_refuses_to_overwrite_unless_asked(folders):
    model, clip, vae = graph_models()
    data = write_dataset(folders["root"] / "subject", CAPTIONS)
    (folders["loras"] / "dco_test.safetensors").write_bytes(b"keep me")
    with pytest.raises(DCOError, match="already exists"):
        run_node(model, clip, vae, **node_inputs(data, steps=1))
    assert (folders["loras"] / "dco_test.safetensors").read_bytes() == b"keep me"
    run_node(model, clip, vae, **node_inputs(data, steps=1, overwrite=True))
    assert formats.load_lora(folders["loras"] / "dco_test.safetensors").modules["unet"]


def test_config_json_dataset_and_validation_previews(folders):
    import json

    import comfy.utils

    model, clip, vae = graph_models()
    data = write_dataset(folders["root"] / "imgs", CAPTIONS)
    cfg = {"mine": {"images": [str(data / f"img{i}.png") for i in range(3)], "prompts": CAPTIONS,
                    "inserting_tokens": ["<obj>"], "initializer_tokens": ["toy"]}}
    (folders["root"] / "config.json").write_text(json.dumps(cfg))
    previews = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: previews.append(p) if p else None)
    try:
        out = run_node(model, clip, vae, **node_inputs(folders["root"] / "config.json", config_name="mine", tokens="",
                                                         validation_prompt="a <obj> on the beach", validation_every=2))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert out[3] == "dco_test.safetensors"  # the tokens came from config.json
    assert len(previews) == 2 and previews[0][0] == "JPEG" and previews[0][1].size == (64, 64)


def test_widget_defaults_follow_the_recipes(tmp_path):
    """Widget defaults come from TrainConfig through the one table, and a node left at its defaults
    trains each preset's recipe exactly (every mapped field, not a hand-picked few)."""
    TrainConfig = harness.pack_module("dco_train.config").TrainConfig
    schema = trainer.DCOTrainer.define_schema()
    inputs = {i.id: i for i in schema.inputs}
    recipe = TrainConfig.subject(tokens={"<dog>": "dog"})
    for widget, field in trainer.WIDGET_FIELDS.items():
        assert widget in inputs, widget  # the ids saved workflows use
        expected = trainer.PRESET_CHOSEN.get(widget, trainer.NODE_DEFAULTS.get(widget, getattr(recipe, field)))
        assert inputs[widget].default == expected, widget
    not_config = {"model", "clip", "vae", "dataset_dir", "config_name", "preset", "tokens", "output_name", "overwrite",
                  "resume", "validation_prompt", "images", "captions"}
    assert set(inputs) == set(trainer.WIDGET_FIELDS) | not_config
    defaults = {w: inputs[w].default for w in trainer.WIDGET_FIELDS}
    for preset, tokens, made in (("subject", "<dog>=dog", recipe), ("style", "", TrainConfig.style())):
        cfg = trainer.build_config(tmp_path, preset=preset, tokens=tokens, **defaults)
        for widget, field in trainer.WIDGET_FIELDS.items():
            if widget not in trainer.NODE_DEFAULTS:
                assert getattr(cfg, field) == getattr(made, field), (preset, field)
        assert cfg.train_text_encoder_ti == made.train_text_encoder_ti and cfg.tokens == made.tokens
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
