"""Every UNet layout ComfyUI loads as SDXL trains through the DCOTrainer node, and its LoRA loads
back through ComfyUI's stock LoRA loading without a dropped key.

The real layouts (SDXL, SSD-1B, Segmind-Vega, KOALA) are built by ComfyUI on the meta device: true
shapes, no memory. The tiny asymmetric ones are built by the ComfyUI class that loads each kind of
checkpoint (SSD1B, Segmind_Vega, KOALA_700M) with random weights and are trained for two steps.
"""

from __future__ import annotations

import logging

import pytest

import harness

harness.require()

import torch  # noqa: E402

from test_comfy_trainer import CAPTIONS, folders, node_inputs, run_node, write_dataset  # noqa: E402,F401

convert = harness.pack_module("nodes.convert")
sgm = harness.pack_module("dco_train.sgm")
DCOError = harness.pack_module("dco_train.errors").DCOError

PROJECTIONS = (".to_q", ".to_k", ".to_v", ".to_out.0")
DROPPED = ("lora key not loaded", "NOT LOADED")


def _attention_modules(model) -> set[str]:
    """SGM names of every attention projection in ComfyUI's UNet (ComfyUI's own modules)."""
    return {n for n, _ in model.diffusion_model.named_modules() if n.endswith(PROJECTIONS) and ".attn" in n}


# ------------------------------------------------------------------------------- true shapes (meta)
@pytest.mark.parametrize("name", list(harness.TRUE_LAYOUTS))
def test_true_shape_layout_is_sdxl_to_comfyui_and_converts(name):
    import comfy.lora
    import comfy.model_base
    import comfy.model_detection

    cls_name, depths = harness.TRUE_LAYOUTS[name]
    model = harness.true_shape_model(name)
    sd = model.diffusion_model.state_dict()
    # ComfyUI's own detection of these weights: the SDXL subclass, an SDXL model
    detected = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(detected).__name__ == cls_name and isinstance(model, comfy.model_base.SDXL)
    layout = sgm.unet_layout(sd, prefix="")
    assert layout.name == name
    unet = sgm.unet_from_sgm(sd, prefix="")  # strict: every key converts
    # ComfyUI's table for the diffusers form of our conversion gives back the same depths
    table = comfy.model_detection.unet_config_from_diffusers_unet(unet.state_dict(), torch.float16)
    for key in ("transformer_depth", "transformer_depth_output", "transformer_depth_middle"):
        assert table[key] == depths[key], key
    # every attention projection of the trained UNet has a key in ComfyUI's LoRA map
    keymap = comfy.lora.model_lora_keys_unet(model, {})
    projections = [n for n, _ in unet.named_modules() if n.endswith(PROJECTIONS)]
    assert len(projections) == len(_attention_modules(model))
    assert [n for n in projections if "lora_unet_" + n.replace(".", "_") not in keymap] == []


def test_sdxl_has_560_attention_projections():
    assert len(_attention_modules(harness.true_shape_model("SDXL"))) == 70 * 2 * 4


# ------------------------------------------------------------------------------- tiny, trained
@pytest.mark.parametrize("name", ["ssd1b", "vega", "koala", "deep_middle"])
def test_conversion_matches_comfyui_on_asymmetric_layouts(name):
    import comfy.model_base

    with torch.inference_mode():
        model = harness.build_layout_model(name, seed=3)
    assert isinstance(model.model, comfy.model_base.SDXL)
    unet = convert.unet_from_model(model, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    pooled_dim = harness.TINY_UNET["adm_in_channels"] - 6 * harness.TIME_EMBED
    x = torch.randn(2, 4, 16, 12, generator=g)
    ctx, pooled = torch.randn(2, 77, harness.TINY_UNET["context_dim"], generator=g), torch.randn(2, pooled_dim, generator=g)
    t, (h, w, ch, cw) = torch.tensor([120.0, 870.0]), (96.0, 128.0, 8.0, 0.0)
    with torch.no_grad():
        y = model.model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=cw, crop_h=ch, target_width=w,
                                   target_height=h)
        comfy_eps = model.model.diffusion_model(x, timesteps=t, context=ctx, y=y)
        ours = unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled,
                                                  "time_ids": torch.tensor([[h, w, ch, cw, h, w]] * 2)}).sample
    assert (ours - comfy_eps).abs().max().item() < 1e-5  # same weights, float32 rounding only


@pytest.mark.parametrize("name", ["ssd1b", "koala", "deep_middle"])
def test_asymmetric_layout_trains_through_the_node_and_loads_back(name, folders, caplog):
    import comfy.sd
    import comfy.utils

    with torch.inference_mode():
        model, clip, vae = harness.build_layout_model(name), harness.build_clip(), harness.build_vae()
    data = write_dataset(folders["root"] / "subject", CAPTIONS)
    with caplog.at_level(logging.DEBUG):
        new_model, _, lora_name, emb_name, _ = run_node(model, clip, vae, **node_inputs(data, steps=2))
        # and once more through ComfyUI's stock loading of the file, as LoraLoader does
        lora = comfy.utils.load_torch_file(str(folders["loras"] / lora_name), safe_load=True)
        stock_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    assert emb_name
    assert [r.getMessage() for r in caplog.records if any(d in r.getMessage() for d in DROPPED)] == []
    expected = {f"diffusion_model.{n}.weight" for n in _attention_modules(model.model)}
    for patched in (new_model, stock_model):
        assert {k for k, v in patched.patches.items() if v} == expected


def test_untrainable_layout_is_refused_naming_it(folders):
    with torch.inference_mode():
        model, clip, vae = harness.build_layout_model("mixed"), harness.build_clip(), harness.build_vae()
    data = write_dataset(folders["root"] / "subject", CAPTIONS)
    with pytest.raises(DCOError, match=r"SDXL-class UNet with transformer depths \[\[0, 0\], \[1, 0\]\].*mixes .*cannot be trained"):
        run_node(model, clip, vae, **node_inputs(data, steps=2))
    assert not list(folders["loras"].iterdir())
