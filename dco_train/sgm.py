"""SGM (single-file, as ComfyUI and A1111 store SDXL) <-> diffusers/transformers weights.

`components_from_sgm` is the one SGM -> diffusers path: the command line uses it for
`--pretrained_model_name_or_path model.safetensors` and the ComfyUI trainer node for the graph's
MODEL/CLIP (whose state dicts are SGM-layout too). The key conversion is diffusers' own
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`); this module derives the architecture from tensor shapes, so toy
models convert as well as the real one, and builds the modules on the meta device so the
converted modules share storage with the given tensors (no copy).

`components_to_sgm` goes the other way; it exists to write single-file checkpoints of the tiny
model (tests, demo) and needs no library counterpart.
"""

from __future__ import annotations

import re
import warnings
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


def unet_ldm_params(sd: Mapping[str, torch.Tensor], prefix: str = UNET_PREFIX) -> dict[str, Any]:
    """The SGM `network_config.params` of an SDXL-like UNet, read from its weights."""
    keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]
    if "input_blocks.0.0.weight" not in keys:
        raise DCOError("The weights hold no SDXL UNet (no input_blocks.0.0.weight); is this an SDXL checkpoint?")
    if "label_emb.0.0.weight" not in keys:
        raise DCOError("The UNet has no added text/time conditioning (label_emb); it is not an SDXL UNet.")
    g = lambda k: sd[prefix + k]  # noqa: E731
    model_channels = int(g("input_blocks.0.0.weight").shape[0])
    n_input = _count(keys, r"input_blocks\.(\d+)\.")
    downsamples = [i for i in range(n_input) if f"input_blocks.{i}.0.op.weight" in keys]
    levels = len(downsamples) + 1
    num_res_blocks = (n_input - 1 - len(downsamples)) // levels
    channel_mult, attention_resolutions, depth = [], [], []
    for level in range(levels):
        first = 1 + level * (num_res_blocks + 1)
        out_ch = int(g(f"input_blocks.{first}.0.out_layers.3.weight").shape[0])
        channel_mult.append(out_ch // model_channels)
        d = _count(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        depth.append(d)
        if d:
            attention_resolutions.append(2**level)
    ctx_keys = [k for k in keys if k.endswith("attn2.to_k.weight")]
    if not ctx_keys:
        raise DCOError("The UNet has no cross-attention layers; it is not an SDXL UNet.")
    proj_in = g(next(k for k in keys if k.endswith(".1.proj_in.weight")))
    return {
        "in_channels": int(g("input_blocks.0.0.weight").shape[1]),
        "out_channels": int(g("out.2.weight").shape[0]),
        "model_channels": model_channels,
        "channel_mult": channel_mult,
        "num_res_blocks": num_res_blocks,
        "attention_resolutions": attention_resolutions,
        "transformer_depth": [max(d, 1) for d in depth],
        "transformer_depth_middle": _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        "context_dim": int(g(ctx_keys[0]).shape[1]),
        "adm_in_channels": int(g("label_emb.0.0.weight").shape[1]),
        "num_classes": "sequential",
        "use_linear_in_transformer": proj_in.ndim == 2,
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
def _load_module(cls: Any, config: dict[str, Any], state: dict[str, torch.Tensor], what: str):
    """Build `cls(config)` on the meta device and assign `state` (shares storage, no copy)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        module = cls(config) if not isinstance(config, dict) else cls(**config)
    own = module.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.endswith("position_ids")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise DCOError(
            f"The {what} weights do not match an SDXL {what}: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})."
        )
    module.load_state_dict(state, strict=True, assign=True)
    return module


def unet_from_sgm(sd: Mapping[str, torch.Tensor], prefix: str = UNET_PREFIX, num_head_channels: int = HEAD_WIDTH):
    """A diffusers UNet2DConditionModel sharing storage with the SGM-layout tensors in `sd`."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    params = {**unet_ldm_params(sd, prefix), "num_head_channels": num_head_channels}
    ckpt = {("model.diffusion_model." + k[len(prefix):]): v for k, v in sd.items() if k.startswith(prefix)}
    with warnings.catch_warnings():  # image_size is deprecated, but without it the helper guesses from keys
        warnings.simplefilter("ignore", FutureWarning)
        config = create_unet_diffusers_config_from_ldm(_original_config(params, None), ckpt, image_size=1024)
    # The helper only recognises SDXL at context width 2048/1280, and its head count rounds to 0
    # for narrow toy models; both are fixed here so any SDXL-shaped UNet converts.
    config.update(
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        class_embed_type=None,
        projection_class_embeddings_input_dim=params["adm_in_channels"],
        attention_head_dim=[max(1, c // num_head_channels) for c in config["block_out_channels"]],
        transformer_layers_per_block=params["transformer_depth"],
        out_channels=params["out_channels"],
    )
    state = convert_ldm_unet_checkpoint(ckpt, config)
    return _load_module(UNet2DConditionModel, config, state, "UNet")


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
