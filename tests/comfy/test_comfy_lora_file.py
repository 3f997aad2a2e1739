"""The engine's LoRA file format loads through ComfyUI's stock LoraLoader without dropping a key.

The tiny model follows SDXL's module naming (ComfyUI's `unet_to_diffusers` map gives the diffusers
names the engine writes), so a key ComfyUI cannot map shows up exactly as it would for real SDXL:
as a "lora key not loaded" log line. A control LoRA in the reference script's format proves the
log assertion can fail.
"""

from __future__ import annotations

import logging

import harness

harness.require()

import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py)
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

DROPPED = ("lora key not loaded", "NOT LOADED")


def _dropped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if any(d in r.getMessage() for d in DROPPED)]


def test_engine_lora_loads_with_zero_dropped_keys(tmp_path, caplog):
    model, clip = harness.build_model(seed=0), harness.build_clip(seed=0)
    path = harness.save_engine_lora(tmp_path / "dco.safetensors", model, rank=4, alpha=4.0, seed=3, text_encoders=True)
    n_unet = len(harness.diffusers_attention_modules())
    assert n_unet == 32, "the tiny SDXL has 4 transformer blocks x 2 attentions x 4 projections"
    with harness.model_folder("loras", tmp_path), caplog.at_level(logging.DEBUG):
        model_ft, clip_ft = harness.call_node(comfy_nodes.LoraLoader, model=model, clip=clip, lora_name=path.name,
                                              strength_model=1.0, strength_clip=1.0)
    assert _dropped(caplog) == []
    unet_keys = [k for k, v in model_ft.patches.items() if v]
    assert len(unet_keys) == n_unet and all(k.startswith("diffusion_model.") for k in unet_keys)
    assert any(k.endswith("attn2.to_out.0.weight") for k in unet_keys)
    te_keys = [k for k, v in clip_ft.patcher.patches.items() if v]
    assert len(te_keys) == 2 * 3 * 4, "both encoders x 3 layers x q/k/v/out"
    assert {k.split(".")[0] for k in te_keys} == {"clip_l", "clip_g"}


def test_reference_format_is_dropped_control(tmp_path, caplog):
    """The DCO reference script's format (`unet.<diffusers name>.lora.down.weight`) loses every
    attention key in ComfyUI: the assertion above would catch such a file."""
    model, clip = harness.build_model(seed=0), harness.build_clip(seed=0)
    sd = {}
    for name in list(harness.diffusers_attention_modules())[:2]:
        sd[f"unet.{name}.lora.down.weight"] = torch.zeros(4, 64)
        sd[f"unet.{name}.lora.up.weight"] = torch.zeros(64, 4)
    save_file(sd, str(tmp_path / "reference.safetensors"))
    with harness.model_folder("loras", tmp_path), caplog.at_level(logging.DEBUG):
        model_ft, _ = harness.call_node(comfy_nodes.LoraLoader, model=model, clip=clip, lora_name="reference.safetensors",
                                        strength_model=1.0, strength_clip=1.0)
    assert len(_dropped(caplog)) == len(sd)
    assert not any(model_ft.patches.values())


def test_converted_reference_lora_loads_with_zero_dropped_keys(tmp_path, caplog):
    """`python -m dco_train convert` turns the reference's file (diffusers keys, no alpha) into one
    that ComfyUI maps completely: every UNet attention projection and every text-encoder projection."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    model, clip = harness.build_model(seed=0), harness.build_clip(seed=0)
    parts = {"unet": harness.peft_unet_lora(model, 4, seed=3),
             "text_encoder": {"text_model." + k: v for k, v in harness.peft_text_lora(harness.HIDDEN_L, 4, 4).items()},
             "text_encoder_2": {"text_model." + k: v for k, v in harness.peft_text_lora(harness.HIDDEN_G, 4, 5).items()}}
    sd = {f"{c}.{k}": v for c, part in parts.items() for k, v in convert_state_dict_to_diffusers(part).items()}
    assert any(k.endswith(".lora.down.weight") for k in sd), "the fixture must be in the reference's format"
    save_file(sd, str(tmp_path / "pytorch_lora_weights.safetensors"))
    convert = harness.pack_module("dco_train.convert")
    convert.convert_lora(tmp_path / "pytorch_lora_weights.safetensors", tmp_path / "converted.safetensors")
    with harness.model_folder("loras", tmp_path), caplog.at_level(logging.DEBUG):
        model_ft, clip_ft = harness.call_node(comfy_nodes.LoraLoader, model=model, clip=clip,
                                              lora_name="converted.safetensors", strength_model=1.0, strength_clip=1.0)
    assert _dropped(caplog) == []
    assert len([k for k, v in model_ft.patches.items() if v]) == len(harness.diffusers_attention_modules())
    te_keys = [k for k, v in clip_ft.patcher.patches.items() if v]
    assert len(te_keys) == 2 * 3 * 4 and {k.split(".")[0] for k in te_keys} == {"clip_l", "clip_g"}
