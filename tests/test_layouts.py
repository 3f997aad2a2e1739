"""Every UNet layout ComfyUI loads as SDXL (SDXL, SSD-1B, Segmind-Vega, KOALA) converts from SGM
weights and trains: depths are read per block (input, middle, output), not derived from the inputs.

The true-shape layouts are built on the meta device (no weights); the tiny asymmetric ones carry
random weights, so a block mapped to the wrong place changes the output.
"""

from __future__ import annotations

import math

import pytest
import torch

from dco_train import sgm
from dco_train.errors import DCOError
from helpers import quick_config

SDXL_BASE = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
# The published diffusers configs of the SDXL-class models (their unet/config.json depth fields).
TRUE_SHAPES = {
    "SDXL": dict(transformer_layers_per_block=(1, 2, 10)),
    "SSD-1B": dict(transformer_layers_per_block=(1, 2, 4), reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], 1],
                   mid_block_type="UNetMidBlock2D"),
    "Segmind-Vega": dict(transformer_layers_per_block=(1, 1, 2), mid_block_type="UNetMidBlock2D"),
    "KOALA-700M": dict(transformer_layers_per_block=(1, 2, 5), layers_per_block=1, mid_block_type=None),
    "KOALA-1B": dict(transformer_layers_per_block=(1, 2, 6), layers_per_block=1),
}

TINY_BASE = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(1, 1, 1), cross_attention_dim=128, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=64 + 6 * 256, norm_num_groups=32,
)
# Toy versions of the asymmetric patterns (output depths that differ within a level, a lone
# res block or no block in the middle, one res block per level) plus a middle deeper than the
# last level, which diffusers cannot express in its config.
TINY_LAYOUTS = {
    "ssd1b_like": dict(transformer_layers_per_block=[1, [1, 2], 2], reverse_transformer_layers_per_block=[[2, 1, 3], [2, 1, 1], 1],
                       mid_block_type="UNetMidBlock2D"),
    "vega_like": dict(transformer_layers_per_block=[1, 1, 2], mid_block_type="UNetMidBlock2D"),
    "koala_like": dict(transformer_layers_per_block=[1, 1, 2], layers_per_block=1, mid_block_type=None),
    "deep_middle": dict(transformer_layers_per_block=[1, 1, 1], middle_depth=3),
}


def _sgm_unet(unet) -> dict[str, torch.Tensor]:
    return sgm._rename(unet.state_dict(), sgm._unet_names(unet.config), sgm.UNET_PREFIX)


def tiny_unet(name: str, seed: int = 0):
    cfg = {**TINY_BASE, **TINY_LAYOUTS[name]}
    middle = cfg.pop("middle_depth", None)
    torch.manual_seed(seed)
    unet = sgm.build_unet(cfg, middle if middle is not None else sgm._derived_middle_depth(cfg))
    with torch.no_grad():  # diffusers zero-initialises output layers; random ones make every block count
        g = torch.Generator().manual_seed(seed + 1)
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return unet.eval()


def _forward(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x, ctx, pooled = torch.randn(2, 4, 16, 12, generator=g), torch.randn(2, 77, 128, generator=g), torch.randn(2, 64, generator=g)
    time_ids = torch.tensor([[96.0, 128, 8, 0, 96, 128]] * 2)
    with torch.no_grad():
        return unet(x, torch.tensor([120, 870]), ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


# ------------------------------------------------------------------------------- true shapes (meta)
@pytest.mark.parametrize("name", list(TRUE_SHAPES))
def test_reads_every_sdxl_class_layout_at_true_shape(name):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        reference = UNet2DConditionModel(**{**SDXL_BASE, **TRUE_SHAPES[name]})
    sd = _sgm_unet(reference)
    layout = sgm.unet_layout(sd)
    res, inp, mid, out = sgm.KNOWN_LAYOUTS[name]
    assert layout.name == name
    assert [d for level in layout.input_depths for d in level] == list(inp)
    assert [d for level in layout.output_depths for d in level] == list(out) and layout.middle_depth == mid
    unet = sgm.unet_from_sgm(sd)  # strict: every key of the checkpoint lands in the diffusers UNet
    assert set(unet.state_dict()) == set(reference.state_dict())
    assert all(unet.state_dict()[k].shape == v.shape for k, v in reference.state_dict().items())


def test_sdxl_config_stays_diffusers_own():
    """SDXL itself converts to the config diffusers would write (no asymmetric extras)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        reference = UNet2DConditionModel(**{**SDXL_BASE, **TRUE_SHAPES["SDXL"]})
    unet = sgm.unet_from_sgm(_sgm_unet(reference))
    assert unet.config.reverse_transformer_layers_per_block is None
    assert list(unet.config.transformer_layers_per_block) == [1, 2, 10]
    assert unet.config.mid_block_type == "UNetMidBlock2DCrossAttn"


# ------------------------------------------------------------------------------- tiny, with weights
@pytest.mark.parametrize("name", list(TINY_LAYOUTS))
def test_asymmetric_layout_round_trips_with_the_same_outputs(name):
    reference = tiny_unet(name)
    sd = _sgm_unet(reference)
    converted = sgm.unet_from_sgm(sd)
    assert len(sd) == len(converted.state_dict())
    diff = (_forward(reference) - _forward(converted)).abs().max().item()
    assert diff < 1e-5  # same weights, float32 rounding only
    # a different random model is far off: the comparison can tell blocks apart
    assert (_forward(tiny_unet(name, seed=5)) - _forward(converted)).abs().max().item() > 1e-2


def test_deep_middle_is_built_with_its_own_depth():
    converted = sgm.unet_from_sgm(_sgm_unet(tiny_unet("deep_middle")))
    assert len(converted.mid_block.attentions[0].transformer_blocks) == 3
    assert all(len(a.transformer_blocks) == 1 for b in converted.down_blocks for a in getattr(b, "attentions", []))


def test_mixed_attention_within_a_level_is_refused_naming_the_layout():
    sd = _sgm_unet(tiny_unet("vega_like"))
    sd = {k: v for k, v in sd.items() if not k.startswith(sgm.UNET_PREFIX + "output_blocks.4.1.")}
    with pytest.raises(DCOError, match=r"level 1 of its output blocks mixes .*\[1, 0, 1\].*cannot be trained"):
        sgm.unet_from_sgm(sd)


def test_uneven_res_blocks_are_refused():
    sd = _sgm_unet(tiny_unet("koala_like"))
    # drop the second level's downsampler: the levels no longer have one res block each
    sd = {k: v for k, v in sd.items() if ".input_blocks.4.0.op." not in k}
    with pytest.raises(DCOError, match="same number of res blocks"):
        sgm.unet_from_sgm(sd)


@pytest.mark.parametrize("name", ["ssd1b_like", "koala_like"])
def test_asymmetric_single_file_trains(name, tiny, subject_dir, tmp_path, tokenizer_dir):
    """A single-file checkpoint of an asymmetric layout loads through the command line's path and
    trains two DCO steps with tokens; the LoRA covers every attention projection of that layout."""
    from dco_train.formats import load_lora
    from dco_train.models import load_sdxl, save_single_file
    from dco_train.train import RunOptions, train

    tiny.unet = tiny_unet(name)
    path = save_single_file(tiny, tmp_path / f"{name}.safetensors")
    comps = load_sdxl(path, tokenizer_dir=tokenizer_dir)
    res = train(quick_config(data_dir=str(subject_dir), max_train_steps=2, learning_rate=1e-2), comps,
                RunOptions(output_dir=tmp_path / "out", progress_bar=False, log_with=None))
    assert len(res.history) == 2 and all(math.isfinite(h["loss"]) for h in res.history)
    projections = {n for n, _ in tiny_unet(name).named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))}
    trained = set(load_lora(res.lora).modules["unet"])
    assert trained == {"lora_unet_" + n.replace(".", "_") for n in projections}
