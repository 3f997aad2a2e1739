"""Genuine ComfyUI MODEL / CLIP / VAE objects for a tiny SDXL, built in-process in about a second.

Why in-process: ComfyUI's stock checkpoint loader only recognises SDXL with full-size text
encoders (research/comfy-harness.md section 4), so a loadable file would weigh gigabytes. The
objects built here are the real classes (`comfy.model_base.SDXL` behind a `ModelPatcher`,
`comfy.sd.CLIP` with `SDXLTokenizer`/`SDXLClipModel`, `comfy.sd.VAE`), only narrower, with random
weights drawn from a seeded generator so the same seed always gives the same model.

This module is shared by the ComfyUI tests, the test-only fixture pack (`fixture_pack/`) and
`bench/rg_guider.py`. Call `import_comfy()` before anything else: it puts ComfyUI on `sys.path`
and switches it to the CPU before `comfy.model_management` is imported.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Distinct CLIP widths, so that a swapped L/G row fails a shape check. ComfyUI's CLIP-G projection
# is always square (comfy.clip_model.CLIPTextModel), so the projection cannot be non-square here.
HIDDEN_L = 32
HIDDEN_G = 48
TIME_EMBED = 256  # SDXL embeds each of its six size/crop ids with 256 sinusoidal features

# The SDXL block pattern at toy sizes; the same layout as dco_train/tiny.py's diffusers UNet.
TINY_UNET: dict[str, Any] = {
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": [1, 1],
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "transformer_depth_middle": 1,
    "num_head_channels": 16,
    "context_dim": HIDDEN_L + HIDDEN_G,
    "adm_in_channels": HIDDEN_G + 6 * TIME_EMBED,
}

# feasibility.md's "mid" model: SDXL's layout (2 res blocks per level, transformer depth 0/1/2)
# at 128 base channels with real SDXL conditioning widths, ~127 M parameters. Big enough that
# compute, not Python overhead, dominates a step; used by bench/rg_guider.py.
MID_UNET: dict[str, Any] = {
    "model_channels": 128,
    "channel_mult": [1, 2, 4],
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "transformer_depth_middle": 2,
    "num_head_channels": 64,
    "context_dim": 2048,
    "adm_in_channels": 1280 + 6 * TIME_EMBED,
}

LAYOUTS = {"tiny": TINY_UNET, "mid": MID_UNET}

# Toy versions of the SDXL subclasses ComfyUI knows (comfy/supported_models.py), in ComfyUI's
# `unet_config` convention (`transformer_depth` per input res block, `transformer_depth_output`
# per output block from the last one back, middle -1 = a res block only, -2 = none), each with
# the supported-models class that loads it:
# - ssd1b: output depths that differ within a level, a middle without transformer (SSD-1B);
# - vega: mirrored input/output depths, a middle without transformer (Segmind-Vega);
# - koala: one res block per level and no middle (KOALA-700M);
# - deep_middle: a middle deeper than the last level (diffusers cannot say so in its config);
# - mixed: a level whose blocks have and have not attention, which cannot be trained.
TINY_ASYMMETRIC: dict[str, tuple[str, dict[str, Any]]] = {
    "ssd1b": ("SSD1B", {"channel_mult": [1, 1, 2], "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 2, 2, 2],
                        "transformer_depth_output": [0, 0, 0, 1, 1, 2, 3, 1, 2], "transformer_depth_middle": -1}),
    "vega": ("Segmind_Vega", {"channel_mult": [1, 1, 2], "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2],
                              "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "transformer_depth_middle": -1}),
    "koala": ("KOALA_700M", {"channel_mult": [1, 1, 2], "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 1, 2],
                             "transformer_depth_output": [0, 0, 1, 1, 2, 2], "transformer_depth_middle": -2}),
    "deep_middle": ("SDXL", {"transformer_depth_middle": 3}),
    "mixed": ("SDXL", {"channel_mult": [1, 2], "num_res_blocks": [2, 2], "transformer_depth": [0, 0, 1, 0],
                       "transformer_depth_output": [0, 0, 0, 1, 1, 1], "transformer_depth_middle": 1}),
}

# The real layouts, as ComfyUI's own table lists them (comfy/model_detection.py,
# unet_config_from_diffusers_unet), with the class ComfyUI loads each as. Build them on the meta
# device only (`true_shape_model`): SDXL's UNet alone is 2.6 B parameters.
TRUE_LAYOUTS: dict[str, tuple[str, dict[str, Any]]] = {
    "SDXL": ("SDXL", {"num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
                      "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}),
    "SSD-1B": ("SSD1B", {"num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 4, 4], "transformer_depth_middle": -1,
                         "transformer_depth_output": [0, 0, 0, 1, 1, 2, 10, 4, 4]}),
    "Segmind-Vega": ("Segmind_Vega", {"num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 2, 2],
                                      "transformer_depth_middle": -1, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2]}),
    "KOALA-700M": ("KOALA_700M", {"num_res_blocks": [1, 1, 1], "transformer_depth": [0, 2, 5], "transformer_depth_middle": -2,
                                  "transformer_depth_output": [0, 0, 2, 2, 5, 5]}),
    "KOALA-1B": ("KOALA_1B", {"num_res_blocks": [1, 1, 1], "transformer_depth": [0, 2, 6], "transformer_depth_middle": 6,
                              "transformer_depth_output": [0, 0, 2, 2, 6, 6]}),
}

TINY_VAE_PARAMS: dict[str, Any] = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
    },
}


# ----------------------------------------------------------------------------- locating ComfyUI
def comfy_path() -> Path | None:
    """The ComfyUI checkout to test against: `$COMFYUI_PATH`, else `~/ComfyUI`, else None."""
    raw = os.environ.get("COMFYUI_PATH") or str(Path.home() / "ComfyUI")
    path = Path(raw).expanduser()
    return path.resolve() if (path / "comfy" / "samplers.py").is_file() else None


def import_comfy(path: Path | None = None, cpu: bool = True) -> Path:
    """Make `import comfy` work in this process (on the CPU unless `cpu=False`). Idempotent."""
    path = path or comfy_path()
    if path is None:
        raise RuntimeError("No ComfyUI checkout found; set COMFYUI_PATH.")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        args.cpu = cpu  # must happen before comfy.model_management decides on a device
    return path


def comfy_version() -> str:
    import comfyui_version  # type: ignore[import-not-found]

    return str(comfyui_version.__version__)


# ----------------------------------------------------------------------------- random weights
def random_state_dict(reference: dict[str, Any], seed: int) -> dict[str, Any]:
    """Seeded random tensors shaped like `reference`: weights ~ N(0, 1/fan_in), norm scales
    near 1, biases near 0, so deep random networks stay finite."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for key, ref in reference.items():
        shape = tuple(ref.shape)
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            value = noise / fan_in**0.5
        elif key.endswith(".bias") or len(shape) == 0:
            value = noise * 0.02
        else:  # 1-D weights are normalisation scales
            value = 1.0 + 0.1 * noise
        out[key] = value.to(ref.dtype)
    return out


# ----------------------------------------------------------------------------- MODEL / CLIP / VAE
def unet_config(layout: str = "tiny") -> dict[str, Any]:
    """The `unet_config` ComfyUI's `detect_unet_config` would produce for `layout`."""
    import torch

    base = LAYOUTS[layout]
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "in_channels": 4, "dtype": torch.float32,
        "use_linear_in_transformer": True, "use_temporal_resblock": False, "use_temporal_attention": False,
        "num_heads": -1, **{k: (list(v) if isinstance(v, list) else v) for k, v in base.items()},
    }


def build_model(layout: str = "tiny", seed: int = 0, prediction: str = "eps", dtype: Any = None) -> Any:
    """A `ModelPatcher` around a `comfy.model_base.SDXL` of the given layout (eps or v prediction),
    stored and computed in `dtype` (float32 by default)."""
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    dtype = dtype or torch.float32
    config = unet_config(layout)
    config["dtype"] = dtype
    mc = comfy.supported_models.SDXL(config)
    mc.unet_config["num_head_channels"] = config["num_head_channels"]  # the class forces 64
    mc.set_inference_dtype(dtype, None)
    marker = {"v_pred": torch.tensor([])} if prediction == "v" else {}
    model = mc.get_model(marker, "")
    model.load_model_weights(random_state_dict(model.diffusion_model.state_dict(), seed), "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def layout_unet_config(name: str) -> tuple[str, dict[str, Any]]:
    """(supported-models class name, `unet_config`) of a `TINY_ASYMMETRIC` layout."""
    cls_name, overrides = TINY_ASYMMETRIC[name]
    return cls_name, {**unet_config("tiny"), **{k: (list(v) if isinstance(v, list) else v) for k, v in overrides.items()}}


def build_layout_model(name: str, seed: int = 0, dtype: Any = None) -> Any:
    """A `ModelPatcher` of the tiny asymmetric layout `name` (`TINY_ASYMMETRIC`), built by the
    ComfyUI class that loads such a checkpoint (SSD1B, Segmind_Vega, KOALA_700M, SDXL)."""
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    dtype = dtype or torch.float32
    cls_name, config = layout_unet_config(name)
    config["dtype"] = dtype
    mc = getattr(comfy.supported_models, cls_name)(config)
    mc.unet_config["num_head_channels"] = config["num_head_channels"]  # the class forces 64
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({}, "")
    model.load_model_weights(random_state_dict(model.diffusion_model.state_dict(), seed), "")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def true_shape_model(name: str) -> Any:
    """The `comfy.model_base` model of a real SDXL-class layout (`TRUE_LAYOUTS`) on the meta device:
    true shapes, no memory. Built as ComfyUI builds a checkpoint it detected as `name`."""
    import torch

    import comfy.supported_models

    cls_name, depths = TRUE_LAYOUTS[name]
    config = {**unet_config("tiny"), "model_channels": 320, "channel_mult": [1, 2, 4], "num_head_channels": 64,
              "context_dim": 2048, "adm_in_channels": 2816, "dtype": torch.float16, **depths}
    mc = getattr(comfy.supported_models, cls_name)(config)
    return mc.get_model({}, "", device=torch.device("meta"))


def build_clip(seed: int = 0, embedding_directory: str | list[str] | None = None) -> Any:
    """An SDXL `comfy.sd.CLIP` (both encoders, three layers each, 32 and 48 wide) with the real BPE tokenizer."""
    import torch

    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    def te(hidden: int) -> dict[str, int]:
        return {"hidden_size": hidden, "intermediate_size": hidden * 4, "num_attention_heads": 2,
                "num_hidden_layers": 3, "projection_dim": hidden}

    options = {"clip_l_model_config": te(HIDDEN_L), "clip_g_model_config": te(HIDDEN_G), "dtype": torch.float32}
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, parameters=0, model_options=options)
    clip.load_sd(random_state_dict(clip.cond_stage_model.state_dict(), seed + 1), full_model=True)
    return clip


def build_vae(seed: int = 0) -> Any:
    """A 4-level KL VAE (x8 like SDXL's), 32 channels wide."""
    import comfy.ldm.models.autoencoder
    import comfy.sd

    params = {"embed_dim": TINY_VAE_PARAMS["embed_dim"], "ddconfig": dict(TINY_VAE_PARAMS["ddconfig"])}
    reference = comfy.ldm.models.autoencoder.AutoencoderKL(**params).state_dict()
    return comfy.sd.VAE(sd=random_state_dict(reference, seed + 2), config={"params": params})


def build_tiny_sdxl(seed: int = 0, embedding_directory: str | list[str] | None = None) -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, VAE) of the tiny SDXL."""
    return build_model("tiny", seed), build_clip(seed, embedding_directory), build_vae(seed)


def encode(clip: Any, text: str) -> list:
    """CONDITIONING for `text`, exactly what the stock CLIP Text Encode node produces."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def model_hash(model: Any) -> str:
    """SHA-256 over every tensor of the shared torch module behind a ModelPatcher (or a module)."""
    import torch

    module = getattr(model, "model", model)
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- engine-format LoRA files
ATTENTION_SUFFIXES = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")


def diffusers_attention_modules(layout: str = "tiny") -> dict[str, str]:
    """diffusers module name -> ComfyUI (SGM) module name for every attention projection,
    taken from ComfyUI's own `unet_to_diffusers` map (the names DCO's LoRA targets)."""
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(unet_config(layout))
    return {
        d[: -len(".weight")]: s[: -len(".weight")]
        for d, s in mapping.items()
        if d.endswith(ATTENTION_SUFFIXES) and ".attentions." in d
    }


def peft_unet_lora(model: Any, rank: int, seed: int, layout: str = "tiny", std: float = 0.3) -> dict[str, Any]:
    """A peft-format (`<diffusers name>.lora_A/.lora_B.weight`) UNet LoRA with random A and B,
    shaped for `model`'s attention projections (both matrices non-zero so the effect is visible)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sd = model.model.diffusion_model.state_dict()
    out: dict[str, Any] = {}
    for dname, sgm in diffusers_attention_modules(layout).items():
        out_f, in_f = sd[sgm + ".weight"].shape
        out[dname + ".lora_A.weight"] = torch.randn(rank, in_f, generator=gen) * std / in_f**0.5
        out[dname + ".lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * std / rank**0.5
    return out


def peft_text_lora(hidden: int, rank: int, seed: int, layers: int = 3) -> dict[str, Any]:
    """A peft-format text-encoder LoRA with transformers-5 names (no `text_model.` level)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            name = f"encoder.layers.{i}.self_attn.{proj}"
            out[name + ".lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.1
            out[name + ".lora_B.weight"] = torch.randn(hidden, rank, generator=gen) * 0.1
    return out


def save_engine_lora(path: str | os.PathLike, model: Any, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                     text_encoders: bool = False, layout: str = "tiny") -> Path:
    """Write a LoRA file the way the engine does (`dco_train.formats.save_lora`, fp32)."""
    save_lora = pack_module("dco_train.formats").save_lora
    state = {"unet": peft_unet_lora(model, rank, seed, layout)}
    alphas = {"unet": alpha}
    if text_encoders:
        state["text_encoder"] = peft_text_lora(HIDDEN_L, rank, seed + 1)
        state["text_encoder_2"] = peft_text_lora(HIDDEN_G, rank, seed + 2)
        alphas.update(text_encoder=alpha, text_encoder_2=alpha)
    return save_lora(path, state, alphas, dtype="fp32")


# ----------------------------------------------------------------------------- the pack under test
PACK_NAME = "comfyui_dco_under_test"


def load_pack() -> Any:
    """Import this repository as a package (its folder name has a hyphen, as in custom_nodes)."""
    import importlib.util

    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def pack_module(name: str) -> Any:
    """A submodule of the pack, e.g. `pack_module("nodes.guider")`."""
    import importlib

    load_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")


# ----------------------------------------------------------------------------- calling nodes directly
def call_node(cls: type, **inputs: Any) -> tuple:
    """Run a node class the way the executor would, V1 (`FUNCTION`) or V3 (`execute`), and return
    its outputs as a tuple. Stock nodes moved from V1 to V3 between ComfyUI v0.3.64 and v0.8.0."""
    if hasattr(cls, "FUNCTION"):
        return tuple(getattr(cls(), cls.FUNCTION)(**inputs))
    out = cls.execute(**inputs)
    return tuple(out.result if hasattr(out, "result") else out.args)


def require() -> None:
    """Skip the calling test module, with the reason, when ComfyUI or its dependencies are missing."""
    import pytest

    reason = why_unavailable()
    if reason:
        pytest.skip(reason, allow_module_level=True)


_UNAVAILABLE: list[str | None] = []


def why_unavailable() -> str | None:
    """None when ComfyUI and the pack's dependencies import here, else a sentence saying why not."""
    if _UNAVAILABLE:
        return _UNAVAILABLE[0]
    import importlib.util

    reason = None
    path = comfy_path()
    # ComfyUI's own dependencies (checked before ComfyUI goes on sys.path, whose top-level
    # `utils`, `app`, `nodes` ... would otherwise shadow other modules in a foreign Python)
    absent = [m for m in ("torchsde", "einops", "aiohttp", "diffusers", "peft", "safetensors")
              if importlib.util.find_spec(m) is None]
    if path is None:
        reason = ("no ComfyUI checkout at $COMFYUI_PATH or ~/ComfyUI; run these tests with "
                  "tests/comfy/run.sh (ComfyUI's venv python)")
    elif absent:
        reason = (f"this Python lacks {', '.join(absent)} (ComfyUI's dependencies and the pack's); run "
                  f"tests/comfy/run.sh, which uses {path}/.venv/bin/python")
    else:
        try:
            import_comfy(path)
            import comfy.samplers  # noqa: F401
            import comfy_api.latest  # noqa: F401
            import diffusers  # noqa: F401
            import safetensors  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
            reason = (f"ComfyUI at {path} does not import in this Python ({type(exc).__name__}: {exc}); "
                      f"run tests/comfy/run.sh, which uses {path}/.venv/bin/python")
    _UNAVAILABLE.append(reason)
    return reason


def server_base(base: Path, pack_name: str = "ComfyUI-DCO") -> Path:
    """A ComfyUI base directory for a test server: `custom_nodes/` links to this repository and to
    the test-only fixture pack, and empty `models/loras` and `models/embeddings` folders."""
    nodes_dir = base / "custom_nodes"
    nodes_dir.mkdir(parents=True, exist_ok=True)
    os.symlink(REPO_ROOT, nodes_dir / pack_name)
    os.symlink(Path(__file__).resolve().parent / "fixture_pack", nodes_dir / "dco_test_fixture")
    for kind in ("loras", "embeddings"):
        (base / "models" / kind).mkdir(parents=True, exist_ok=True)
    return base


class model_folder:
    """Register `path` as an extra ComfyUI model folder (`loras`, `embeddings`, ...) for a block."""

    def __init__(self, kind: str, path: str | os.PathLike):
        self.kind, self.path = kind, str(path)

    def __enter__(self) -> str:
        import folder_paths

        self._saved = folder_paths.folder_names_and_paths[self.kind]
        folder_paths.folder_names_and_paths[self.kind] = ([self.path] + list(self._saved[0]), self._saved[1])
        folder_paths.filename_list_cache.pop(self.kind, None)
        return self.path

    def __exit__(self, *exc: Any) -> None:
        import folder_paths

        folder_paths.folder_names_and_paths[self.kind] = self._saved
        folder_paths.filename_list_cache.pop(self.kind, None)
