"""SGM (single-file, as ComfyUI and A1111 store SDXL) <-> diffusers/transformers weights.

`components_from_sgm` is the one SGM -> diffusers path: the command line uses it for
`--pretrained_model_name_or_path model.safetensors` and the ComfyUI trainer node for the graph's
MODEL/CLIP (whose state dicts are SGM-layout too). The key conversion is diffusers' own
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`); this module derives the architecture from tensor shapes, so toy
models convert as well as the real one, and builds the modules on the meta device so the
converted modules share storage with the given tensors (no copy). The UNet's transformer depths
are read per block (input, middle, output), so every layout ComfyUI loads as SDXL converts:
SDXL, SSD-1B, Segmind-Vega and KOALA (`KNOWN_LAYOUTS`, `unet_layout`).

`components_to_sgm` goes the other way; it exists to write single-file checkpoints of the tiny
model (tests, demo) and needs no library counterpart.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .errors import DCOError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
HEAD_WIDTH = 64  # SDXL's attention heads (UNet and both CLIPs) are 64 wide


# ------------------------------------------------------------------------------- architecture
def _count(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


# The transformer depths of every UNet ComfyUI loads as SDXL (comfy/supported_models.py: SDXL and
# its subclasses SSD1B, Segmind_Vega, KOALA_700M, KOALA_1B; depths from comfy/model_detection.py),
# as (res blocks per level, input blocks, middle, output blocks). Input and output depths are
# listed per res block in block order (output_blocks.0 first, unlike ComfyUI's reversed
# `transformer_depth_output`); the middle is ComfyUI's convention: -1 = one res block and no
# transformer, -2 = no middle block. Used to name a layout in messages and by the tests.
KNOWN_LAYOUTS: dict[str, tuple[int, tuple[int, ...], int, tuple[int, ...]]] = {
    "SDXL": (2, (0, 0, 2, 2, 10, 10), 10, (10, 10, 10, 2, 2, 2, 0, 0, 0)),
    "SSD-1B": (2, (0, 0, 2, 2, 4, 4), -1, (4, 4, 10, 2, 1, 1, 0, 0, 0)),
    "Segmind-Vega": (2, (0, 0, 1, 1, 2, 2), -1, (2, 2, 2, 1, 1, 1, 0, 0, 0)),
    "KOALA-700M": (1, (0, 2, 5), -2, (5, 5, 2, 2, 0, 0)),
    "KOALA-1B": (1, (0, 2, 6), 6, (6, 6, 2, 2, 0, 0)),
}
MIDDLE_RESNET_ONLY, NO_MIDDLE = -1, -2


@dataclass(frozen=True)
class UNetLayout:
    """The block structure of an SDXL-class UNet, read from its SGM weights.

    SDXL-class models differ in where their transformer blocks are: SSD-1B and Segmind-Vega keep
    SDXL's levels but have other depths in the input, middle and output blocks (the output blocks
    of one level may even differ among themselves), KOALA drops res blocks and the middle. So each
    depth is read on its own rather than derived from the input blocks.
    """

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    input_depths: tuple[tuple[int, ...], ...]  # per level (highest resolution first), per res block
    middle_depth: int  # transformer blocks in the middle; MIDDLE_RESNET_ONLY or NO_MIDDLE
    output_depths: tuple[tuple[int, ...], ...]  # per up level (lowest resolution first, as up_blocks), per block
    context_dim: int
    adm_in_channels: int
    use_linear_in_transformer: bool

    @property
    def name(self) -> str:
        """The model family this layout belongs to ("SSD-1B"), or its depths when none matches."""
        flat_in = tuple(d for level in self.input_depths for d in level)
        flat_out = tuple(d for level in self.output_depths for d in level)
        for name, (res, inp, mid, out) in KNOWN_LAYOUTS.items():
            if (res, inp, mid, out) == (self.num_res_blocks, flat_in, self.middle_depth, flat_out):
                return name
        return self.describe()

    def describe(self) -> str:
        middle = {MIDDLE_RESNET_ONLY: "a res block only", NO_MIDDLE: "none"}.get(self.middle_depth, str(self.middle_depth))
        return (f"an SDXL-class UNet with transformer depths {[list(x) for x in self.input_depths]} in the input "
                f"blocks, {middle} in the middle and {[list(x) for x in self.output_depths]} in the output blocks")


def _block_depths(keys: list[str], kind: str) -> dict[int, int]:
    """{block index: transformer blocks} of `input_blocks` / `output_blocks` (absent = no attention)."""
    depths: dict[int, int] = {}
    pattern = re.compile(rf"{kind}\.(\d+)\.1\.transformer_blocks\.(\d+)\.")
    for k in keys:
        if m := pattern.match(k):
            block, t = int(m.group(1)), int(m.group(2))
            depths[block] = max(depths.get(block, 0), t + 1)
    return depths


def unet_layout(sd: Mapping[str, torch.Tensor], prefix: str = UNET_PREFIX) -> UNetLayout:
    """The `UNetLayout` of the SGM-layout UNet weights in `sd` (keys under `prefix`)."""
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    if "input_blocks.0.0.weight" not in keys:
        raise DCOError("The weights hold no SDXL UNet (no input_blocks.0.0.weight); is this an SDXL checkpoint?")
    if "label_emb.0.0.weight" not in keys:
        raise DCOError("The UNet has no added text/time conditioning (label_emb); it is not an SDXL UNet.")
    g = lambda k: sd[prefix + k]  # noqa: E731
    model_channels = int(g("input_blocks.0.0.weight").shape[0])
    n_input = _count(keys, r"input_blocks\.(\d+)\.")
    n_output = _count(keys, r"output_blocks\.(\d+)\.")
    downsamples = [i for i in range(n_input) if f"input_blocks.{i}.0.op.weight" in keys]
    levels = len(downsamples) + 1
    num_res_blocks = (n_input - 1 - len(downsamples)) // levels
    uniform = downsamples == [(level + 1) * (num_res_blocks + 1) for level in range(levels - 1)]
    if not uniform or n_output != levels * (num_res_blocks + 1) or num_res_blocks < 1:
        raise DCOError(
            f"The UNet's {n_input} input and {n_output} output blocks over {levels} levels do not have the same number "
            "of res blocks at every level; diffusers' SDXL UNet cannot hold this layout, so it cannot be trained."
        )
    ins, outs = _block_depths(keys, "input_blocks"), _block_depths(keys, "output_blocks")
    input_depths = tuple(
        tuple(ins.get(1 + level * (num_res_blocks + 1) + j, 0) for j in range(num_res_blocks)) for level in range(levels)
    )
    output_depths = tuple(
        tuple(outs.get(level * (num_res_blocks + 1) + j, 0) for j in range(num_res_blocks + 1)) for level in range(levels)
    )
    channel_mult = tuple(
        int(g(f"input_blocks.{1 + level * (num_res_blocks + 1)}.0.out_layers.3.weight").shape[0]) // model_channels
        for level in range(levels)
    )
    if "middle_block.1.proj_in.weight" in keys:
        middle = _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    else:
        middle = MIDDLE_RESNET_ONLY if "middle_block.0.in_layers.0.weight" in keys else NO_MIDDLE
    ctx_keys = [k for k in keys if k.endswith("attn2.to_k.weight")]
    if not ctx_keys:
        raise DCOError("The UNet has no cross-attention layers; it is not an SDXL UNet.")
    proj_in = g(next(k for k in keys if k.endswith(".1.proj_in.weight")))
    return UNetLayout(
        in_channels=int(g("input_blocks.0.0.weight").shape[1]), out_channels=int(g("out.2.weight").shape[0]),
        model_channels=model_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
        input_depths=input_depths, middle_depth=middle, output_depths=output_depths,
        context_dim=int(g(ctx_keys[0]).shape[1]), adm_in_channels=int(g("label_emb.0.0.weight").shape[1]),
        use_linear_in_transformer=proj_in.ndim == 2,
    )


def unet_ldm_params(sd: Mapping[str, torch.Tensor], prefix: str = UNET_PREFIX) -> dict[str, Any]:
    """The SGM `network_config.params` of an SDXL-like UNet, read from its weights (one depth per
    level, the input blocks'; `unet_layout` has every block's)."""
    layout = unet_layout(sd, prefix)
    return _ldm_params(layout)


def _ldm_params(layout: UNetLayout) -> dict[str, Any]:
    depth = [max(level) for level in layout.input_depths]
    return {
        "in_channels": layout.in_channels,
        "out_channels": layout.out_channels,
        "model_channels": layout.model_channels,
        "channel_mult": list(layout.channel_mult),
        "num_res_blocks": layout.num_res_blocks,
        "attention_resolutions": [2**level for level, d in enumerate(depth) if d],
        "transformer_depth": [max(d, 1) for d in depth],
        "transformer_depth_middle": layout.middle_depth,
        "context_dim": layout.context_dim,
        "adm_in_channels": layout.adm_in_channels,
        "num_classes": "sequential",
        "use_linear_in_transformer": layout.use_linear_in_transformer,
    }


def vae_ldm_params(sd: Mapping[str, torch.Tensor], prefix: str = VAE_PREFIX) -> dict[str, Any]:
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    if "encoder.conv_in.weight" not in keys:
        raise DCOError("The checkpoint holds no VAE (first_stage_model.*); use a full SDXL checkpoint.")
    ch = int(sd[prefix + "encoder.conv_in.weight"].shape[0])
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    mult = [int(sd[prefix + f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in range(levels)]
    return {
        "ch": ch,
        "ch_mult": mult,
        "num_res_blocks": _count(keys, r"encoder\.down\.0\.block\.(\d+)\."),
        "z_channels": int(sd[prefix + "decoder.conv_in.weight"].shape[1]),
        "in_channels": int(sd[prefix + "encoder.conv_in.weight"].shape[1]),
        "out_ch": int(sd[prefix + "decoder.conv_out.weight"].shape[0]),
        "double_z": True,
    }


def _original_config(unet_params: dict[str, Any], vae_params: dict[str, Any] | None) -> dict[str, Any]:
    dd = vae_params or {"ch_mult": [1, 2, 4, 4]}
    return {"model": {"params": {
        "network_config": {"params": unet_params},
        "first_stage_config": {"params": {"ddconfig": dd}},
    }}}


# ------------------------------------------------------------------------------- SGM -> diffusers
def _load_module(cls: Any, config: Any, state: dict[str, torch.Tensor], what: str, build: Any = None,
                 layout: str | None = None):
    """Build `cls(config)` (or `build()`) on the meta device and assign `state` (shares storage, no copy)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        if build is not None:
            module = build()
        else:
            module = cls(config) if not isinstance(config, dict) else cls(**config)
    own = module.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.endswith("position_ids")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        target = f"the diffusers {what} built for {layout}" if layout else f"an SDXL {what}"
        raise DCOError(
            f"The {what} weights do not match {target}: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); this layout cannot be trained."
        )
    module.load_state_dict(state, strict=True, assign=True)
    return module


def _level_depth(depths: tuple[int, ...]) -> int | list[int]:
    """One level's depths as diffusers takes them: an int when every block has the same."""
    return depths[0] if len(set(depths)) == 1 else list(depths)


def unet_config_from_layout(layout: UNetLayout, ckpt: Mapping[str, torch.Tensor],
                            num_head_channels: int = HEAD_WIDTH) -> dict[str, Any]:
    """The `UNet2DConditionModel` config of an SDXL-class `layout` (`ckpt`: its weights, SGM keys).

    diffusers' `create_unet_diffusers_config_from_ldm` takes one transformer depth per level from
    the input blocks and mirrors it into the up blocks and the middle, which fits SDXL but not
    SSD-1B, Segmind-Vega or KOALA. It still gives the base config; this sets each down block's
    depths (`transformer_layers_per_block`, a list per level where its blocks differ), the up
    blocks' (`reverse_transformer_layers_per_block`, only where they are not the mirror image, so
    SDXL's config stays diffusers' own), the block types of both from their own depths, and the
    middle's type (cross-attention, a lone res block, or none). A middle whose depth differs from
    what diffusers derives is rebuilt after construction (`build_unet`).
    """
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    for what, levels in (("input", layout.input_depths), ("output", layout.output_depths)):
        for i, level in enumerate(levels):
            if 0 in level and any(level):
                raise DCOError(
                    f"The UNet is {layout.name}: level {i} of its {what} blocks mixes blocks with and without "
                    f"attention (depths {list(level)}); diffusers' UNet cannot hold that, so it cannot be trained."
                )
    with warnings.catch_warnings():  # image_size is deprecated, but without it the helper guesses from keys
        warnings.simplefilter("ignore", FutureWarning)
        config = create_unet_diffusers_config_from_ldm(
            _original_config({**_ldm_params(layout), "num_head_channels": num_head_channels}, None), dict(ckpt),
                                                       image_size=1024)
    down = [_level_depth(level) if any(level) else 1 for level in layout.input_depths]
    up = [_level_depth(level) if any(level) else 1 for level in layout.output_depths]
    mirrored = all(isinstance(d, int) for d in down) and up == down[::-1]
    middle_type = {MIDDLE_RESNET_ONLY: "UNetMidBlock2D", NO_MIDDLE: None}.get(layout.middle_depth, "UNetMidBlock2DCrossAttn")
    # The helper only recognises SDXL at context width 2048/1280, and its head count rounds to 0
    # for narrow toy models; both are fixed here so any SDXL-shaped UNet converts.
    config.update(
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        class_embed_type=None,
        projection_class_embeddings_input_dim=layout.adm_in_channels,
        attention_head_dim=[max(1, c // num_head_channels) for c in config["block_out_channels"]],
        down_block_types=["CrossAttnDownBlock2D" if any(level) else "DownBlock2D" for level in layout.input_depths],
        up_block_types=["CrossAttnUpBlock2D" if any(level) else "UpBlock2D" for level in layout.output_depths],
        transformer_layers_per_block=down,
        reverse_transformer_layers_per_block=None if mirrored else up,
        mid_block_type=middle_type,
        out_channels=layout.out_channels,
    )
    return config


def _derived_middle_depth(config: Mapping[str, Any]) -> int:
    """The middle depth diffusers builds: the last down level's (first) depth."""
    last = config["transformer_layers_per_block"][-1]
    return last if isinstance(last, int) else last[0]


def build_unet(config: Mapping[str, Any], middle_depth: int):
    """`UNet2DConditionModel(**config)` whose cross-attention middle has `middle_depth` blocks.

    diffusers gives the middle the depth of the last down level and has no setting of its own for
    it; a layout whose middle differs gets a middle block built by diffusers' own `get_mid_block`
    with the model's settings (the config then still names the derived depth, so save such a
    UNet through `components_to_sgm`, not `save_pretrained`).
    """
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**config)
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn" or \
            middle_depth == _derived_middle_depth(config):
        return unet
    from diffusers.models.unets.unet_2d_blocks import get_mid_block

    c = unet.config
    heads = c.num_attention_heads or c.attention_head_dim
    heads = heads[-1] if isinstance(heads, (list, tuple)) else heads
    unet.mid_block = get_mid_block(
        "UNetMidBlock2DCrossAttn", temb_channels=unet.time_embedding.linear_2.out_features,
        in_channels=c.block_out_channels[-1], resnet_eps=c.norm_eps, resnet_act_fn=c.act_fn,
        resnet_groups=c.norm_num_groups, output_scale_factor=c.mid_block_scale_factor,
        transformer_layers_per_block=middle_depth, num_attention_heads=heads, cross_attention_dim=c.cross_attention_dim,
        dual_cross_attention=c.dual_cross_attention, use_linear_projection=c.use_linear_projection,
        upcast_attention=c.upcast_attention, resnet_time_scale_shift=c.resnet_time_scale_shift,
        attention_type=c.attention_type, attention_head_dim=heads, dropout=c.dropout,
    )
    return unet


def unet_from_sgm(sd: Mapping[str, torch.Tensor], prefix: str = UNET_PREFIX, num_head_channels: int = HEAD_WIDTH):
    """A diffusers UNet2DConditionModel sharing storage with the SGM-layout tensors in `sd`, for
    any layout ComfyUI loads as SDXL (`KNOWN_LAYOUTS`)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    layout = unet_layout(sd, prefix)
    ckpt = {("model.diffusion_model." + k[len(prefix):]): v for k, v in sd.items() if k.startswith(prefix)}
    config = unet_config_from_layout(layout, ckpt, num_head_channels)
    state = convert_ldm_unet_checkpoint(ckpt, config)
    return _load_module(UNet2DConditionModel, config, state, "UNet", build=lambda: build_unet(config, layout.middle_depth),
                        layout=layout.name)


def vae_from_sgm(sd: Mapping[str, torch.Tensor], prefix: str = VAE_PREFIX, scaling_factor: float = 0.13025):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    params = vae_ldm_params(sd, prefix)
    ckpt = {("first_stage_model." + k[len(prefix):]): v for k, v in sd.items() if k.startswith(prefix)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = create_vae_diffusers_config_from_ldm(
            _original_config({}, params), ckpt, image_size=1024, scaling_factor=scaling_factor
        )
    state = convert_ldm_vae_checkpoint(ckpt, config)
    return _load_module(AutoencoderKL, config, state, "VAE")


def clip_from_hf(state: Mapping[str, torch.Tensor], *, hidden_act: str, eos_token_id: int,
                 projection: bool, num_heads: int | None = None, what: str = "text encoder"):
    """A transformers CLIP text model from HF-layout weights (`text_model.*`, optional
    `text_projection.weight`), built on the meta device so it shares storage with `state`.

    SDXL single files store CLIP-L this way and ComfyUI's CLIP objects store both encoders this
    way. The head count is not visible in the weights: SDXL's heads are 64 wide, which is the
    default; ComfyUI's own config gives it for other models.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    state = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith(("position_ids", "logit_scale"))}
    if not projection:
        state.pop("text_projection.weight", None)
    tm = "text_model."
    if tm + "embeddings.token_embedding.weight" not in state:
        raise DCOError(f"The {what} weights have no token embedding; they are not a CLIP text encoder.")
    vocab, hidden = state[tm + "embeddings.token_embedding.weight"].shape
    config = CLIPTextConfig(
        vocab_size=int(vocab), hidden_size=int(hidden),
        intermediate_size=int(state[tm + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=_count(list(state), r"text_model\.encoder\.layers\.(\d+)\."),
        num_attention_heads=num_heads or max(1, int(hidden) // HEAD_WIDTH),
        max_position_embeddings=int(state[tm + "embeddings.position_embedding.weight"].shape[0]),
        hidden_act=hidden_act,
        projection_dim=int(state["text_projection.weight"].shape[0]) if projection else int(hidden),
        bos_token_id=eos_token_id - 1, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )
    if projection:
        return _load_module(CLIPTextModelWithProjection, config, state, what)
    state = {k[len(tm):] if k.startswith(tm) else k: v for k, v in state.items()}  # transformers 5 layout
    from transformers import __version__ as tv

    if int(tv.split(".")[0]) < 5:
        state = {tm + k: v for k, v in state.items()}
    return _load_module(CLIPTextModel, config, state, what)


def clip_l_from_sgm(sd: Mapping[str, torch.Tensor], prefix: str = CLIP_L_PREFIX, eos_token_id: int = 49407):
    """CLIP-L as a transformers CLIPTextModel (keys are HF-layout in SDXL single files)."""
    state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not state:
        raise DCOError("The checkpoint holds no CLIP-L text encoder (conditioner.embedders.0.*).")
    return clip_from_hf(state, hidden_act="quick_gelu", eos_token_id=eos_token_id, projection=False, what="CLIP-L text encoder")


def clip_g_from_sgm(sd: Mapping[str, torch.Tensor], prefix: str = CLIP_G_PREFIX, eos_token_id: int = 49407):
    """CLIP-G (OpenCLIP layout in SDXL single files) as a CLIPTextModelWithProjection."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    if prefix + "token_embedding.weight" not in sd:
        raise DCOError("The checkpoint holds no CLIP-G text encoder (conditioner.embedders.1.model.*).")
    hidden = int(sd[prefix + "token_embedding.weight"].shape[1])
    probe = type("Probe", (), {"config": type("C", (), {"hidden_size": hidden})()})()
    state = convert_open_clip_checkpoint(probe, dict(sd), prefix=prefix)
    return clip_from_hf(state, hidden_act="gelu", eos_token_id=eos_token_id, projection=True, what="CLIP-G text encoder")


# ------------------------------------------------------------------------------- diffusers -> SGM
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_names(config: Any) -> list[tuple[str, str]]:
    """(diffusers prefix, SGM prefix) pairs for a UNet2DConditionModel config."""
    n_levels, per = len(config.block_out_channels), config.layers_per_block
    pairs = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),
             ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
             ("mid_block.attentions.0", "middle_block.1")]
    for j in range(2):
        pairs += [(f"mid_block.resnets.{j}.{d}", f"middle_block.{2 * j}.{s}") for d, s in _RESNET.items()]
    for i in range(n_levels):
        for j in range(per):
            k = i * (per + 1) + j + 1
            pairs += [(f"down_blocks.{i}.resnets.{j}.{d}", f"input_blocks.{k}.0.{s}") for d, s in _RESNET.items()]
            pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1"))
        if i < n_levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (per + 1)}.0.op"))
        has_attn = config.up_block_types[i].startswith("CrossAttn")
        for j in range(per + 1):
            k = i * (per + 1) + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.{d}", f"output_blocks.{k}.0.{s}") for d, s in _RESNET.items()]
            pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1"))
        if i < n_levels - 1:
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (per + 1) + per}.{2 if has_attn else 1}.conv"))
    return pairs


def _rename(state: Mapping[str, torch.Tensor], pairs: list[tuple[str, str]], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    pairs = sorted(pairs, key=lambda p: -len(p[0]))
    for key, value in state.items():
        for d, s in pairs:
            if key == d or key.startswith(d + "."):
                out[prefix + s + key[len(d):]] = value
                break
        else:
            raise ValueError(f"No SGM name for the diffusers key {key}.")
    return out


def _vae_names(config: Any) -> list[tuple[str, str]]:
    n = len(config.block_out_channels)
    res = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    pairs = [("encoder.conv_in", "encoder.conv_in"), ("encoder.conv_norm_out", "encoder.norm_out"),
             ("encoder.conv_out", "encoder.conv_out"), ("decoder.conv_in", "decoder.conv_in"),
             ("decoder.conv_norm_out", "decoder.norm_out"), ("decoder.conv_out", "decoder.conv_out"),
             ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        for j in range(2):
            pairs += [(f"{part}.mid_block.resnets.{j}.{d}", f"{part}.mid.block_{j + 1}.{s}") for d, s in res.items()]
        for d, s in {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}.items():
            pairs.append((f"{part}.mid_block.attentions.0.{d}", f"{part}.mid.attn_1.{s}"))
    for i in range(n):
        for j in range(config.layers_per_block):
            pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.{d}", f"encoder.down.{i}.block.{j}.{s}") for d, s in res.items()]
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        for j in range(config.layers_per_block + 1):
            pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.{d}", f"decoder.up.{n - 1 - i}.block.{j}.{s}") for d, s in res.items()]
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv"))
    return pairs


def _clip_g_to_openclip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    tm = "text_model."
    out[prefix + "token_embedding.weight"] = state[tm + "embeddings.token_embedding.weight"]
    out[prefix + "positional_embedding"] = state[tm + "embeddings.position_embedding.weight"]
    out[prefix + "ln_final.weight"] = state[tm + "final_layer_norm.weight"]
    out[prefix + "ln_final.bias"] = state[tm + "final_layer_norm.bias"]
    out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    n = _count(list(state), r"text_model\.encoder\.layers\.(\d+)\.")
    for i in range(n):
        src, dst = f"{tm}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    return out


def components_to_sgm(unet: Any, vae: Any, text_encoder: Any, text_encoder_2: Any) -> dict[str, torch.Tensor]:
    """One SGM-layout state dict (a single-file SDXL checkpoint) from diffusers/transformers modules."""
    out = _rename(unet.state_dict(), _unet_names(unet.config), UNET_PREFIX)
    vae_sd = dict(vae.state_dict())
    for key in list(vae_sd):  # the VAE's mid attention is 1x1 convs in SGM
        if ".mid_block.attentions.0.to_" in key and key.endswith(".weight") and vae_sd[key].ndim == 2:
            vae_sd[key] = vae_sd[key][:, :, None, None]
    out.update(_rename(vae_sd, _vae_names(vae.config), VAE_PREFIX))
    l_state = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in text_encoder.state_dict().items()}
    out.update({CLIP_L_PREFIX + k: v for k, v in l_state.items() if not k.endswith("position_ids")})
    out.update(_clip_g_to_openclip(text_encoder_2.state_dict(), CLIP_G_PREFIX))
    return out
