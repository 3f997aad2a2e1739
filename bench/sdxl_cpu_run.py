#!/usr/bin/env python
"""A real DCO training run at true SDXL base shapes, on the CPU (issue 11, item 2; not part of CI).

1. Writes a random-weight SDXL base (UNet 2.57 B, CLIP-L, CLIP-bigG with projection, VAE, at the
   published configs) as a single-file SGM checkpoint in bf16. The modules are built on the meta
   device and renamed with the engine's own tables (`sgm.components_to_sgm`), and the file is
   streamed tensor by tensor in the safetensors layout, so this process never holds the weights.
2. Checks, on the meta device, that the engine's conversion (`sgm.unet_from_sgm`, `vae_from_sgm`,
   `clip_l_from_sgm`, `clip_g_from_sgm`, strict) takes every key of the file.
3. Trains 2 DCO steps with TI through the command line (`python -m dco_train train`) in a
   subprocess, measuring its peak RSS and wall time.
4. Checks that the LoRA covers every attention projection of the UNet and, when ComfyUI is
   present, that ComfyUI's own LoRA key map on a true-shape SDXL maps every key.

Prints `name value` lines; exits non-zero when a check fails.
`--tiny` runs the same path on dco_train.tiny's model in seconds (what tests/test_sdxl_cpu_run.py runs).

    nice python bench/sdxl_cpu_run.py [--resolution 256] [--keep DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dco_train import sgm  # noqa: E402

log = logging.getLogger("sdxl_cpu_run")

# The published SDXL base configs (stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/,
# text_encoder/, text_encoder_2/ config.json).
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32,
)
SDXL_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, sample_size=1024, scaling_factor=0.13025,
)
CLIP_VOCAB, CLIP_BOS, CLIP_EOS = 49408, 49406, 49407
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              hidden_act="gelu", projection_dim=1280)
WEIGHT_STD = 0.02
ATTENTION_PROJECTION = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


# ------------------------------------------------------------------------------ the model, on meta
def _clip_config(vocab: int, eos: int, **kw: Any):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, max_position_embeddings=77, bos_token_id=eos - 1,
                          eos_token_id=eos, pad_token_id=eos, **kw)


def meta_modules(tiny: bool, vocab: int, eos: int) -> tuple[Any, Any, Any, Any]:
    """(unet, vae, clip_l, clip_g) with the SDXL base (or tiny) shapes on the meta device: no memory."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dco_train import tiny as tiny_mod

    with init_empty_weights():
        if tiny:
            unet = UNet2DConditionModel(**tiny_mod.UNET_CONFIG)
            vae = AutoencoderKL(**tiny_mod.VAE_CONFIG)
            te = CLIPTextModel(tiny_mod.text_encoder_config(vocab, eos, tiny_mod.HIDDEN_L, "quick_gelu"))
            te2 = CLIPTextModelWithProjection(
                tiny_mod.text_encoder_config(vocab, eos, tiny_mod.HIDDEN_G, "gelu", tiny_mod.PROJECTION_G))
        else:
            unet = UNet2DConditionModel(**SDXL_UNET)
            vae = AutoencoderKL(**SDXL_VAE)
            te = CLIPTextModel(_clip_config(vocab, eos, **CLIP_L))
            te2 = CLIPTextModelWithProjection(_clip_config(vocab, eos, **CLIP_G))
    return unet, vae, te, te2


def sgm_shapes(modules: tuple[Any, Any, Any, Any]) -> dict[str, tuple[int, ...]]:
    """The SGM key -> shape table of the modules, from the engine's own renaming."""
    return {k: tuple(v.shape) for k, v in sgm.components_to_sgm(*modules).items()}


# ------------------------------------------------------------------------------ the file, streamed
def _random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Small random weights (0.02-std normal), norm scales 1, biases 0: finite activations throughout."""
    if key.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) <= 1:
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen) * WEIGHT_STD).to(dtype)


def write_random_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16) -> int:
    """Write random tensors of `shapes` as a safetensors file, one tensor at a time.

    safetensors' `save_file` needs every tensor in memory at once (~7 GB here); the format is a
    little-endian u64 header length, a JSON header and the raw data, so it is streamed instead and
    read back with `safe_open` by the checks. Returns the bytes written.
    """
    keys = sorted(shapes)
    size = torch.tensor([], dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "dco.bench": f"random SDXL, seed {seed}"}}
    offset = 0
    for k in keys:
        n = math.prod(shapes[k]) * size
        header[k] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shapes[k]), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for k in keys:
            fh.write(_random_tensor(k, shapes[k], gen, dtype).contiguous().view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)
    return path.stat().st_size


# ------------------------------------------------------------------------------ checks
def check_conversion(path: Path, eos: int = CLIP_EOS) -> dict[str, int]:
    """Load the file's key/shape table through the engine's SGM converters on the meta device.

    The converters are strict (a missing or unexpected key is a DCOError); the loaded modules are
    then renamed back with `components_to_sgm`, and a file key counts as loaded when it comes back
    with its shape.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    state = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in shapes.items()}
    modules = (sgm.unet_from_sgm(state), sgm.vae_from_sgm(state), sgm.clip_l_from_sgm(state, eos_token_id=eos),
               sgm.clip_g_from_sgm(state, eos_token_id=eos))
    back = sgm_shapes(modules)
    loaded = sum(1 for k, s in shapes.items() if back.get(k) == s)
    return {"sgm_keys_total": len(shapes), "sgm_keys_loaded": loaded,
            "unet_params_m": round(sum(p.numel() for p in modules[0].parameters()) / 1e6, 1)}


def attention_projections(unet: Any) -> set[str]:
    """kohya names (`lora_unet_<path with _>`) of every attention projection in the UNet."""
    return {"lora_unet_" + n.replace(".", "_") for n, _ in unet.named_modules() if ATTENTION_PROJECTION.search(n)}


def find_lora(out: Path) -> Path:
    """The LoRA the CLI wrote: diffusers' folder name, else the older `lora.safetensors`."""
    for name in ("pytorch_lora_weights.safetensors", "lora.safetensors"):
        if (out / name).is_file():
            return out / name
    raise SystemExit(f"no LoRA file in {out}: {sorted(p.name for p in out.iterdir())}")


def check_lora(lora_path: Path, unet: Any) -> dict[str, int]:
    from safetensors import safe_open

    with safe_open(str(lora_path), framework="pt") as fh:
        keys = list(fh.keys())
    modules = {k.rsplit(".lora_down.weight", 1)[0] for k in keys if k.endswith(".lora_down.weight")}
    wanted = attention_projections(unet)
    return {"lora_modules": len(modules), "sdxl_attention_projections": len(wanted),
            "lora_missing": len(wanted - modules)}


COMFY_CHECK = r"""
import logging, sys
sys.path.insert(0, sys.argv[1])
import harness
harness.import_comfy()
import comfy.lora, comfy.utils
lost = []
class Catch(logging.Handler):
    def emit(self, record):
        if "lora key not loaded" in record.getMessage():
            lost.append(record.getMessage())
logging.getLogger().addHandler(Catch())
model = harness.true_shape_model("SDXL")
key_map = comfy.lora.model_lora_keys_unet(model, {})
lora = comfy.utils.load_torch_file(sys.argv[2], safe_load=True)
patches = comfy.lora.load_lora(lora, key_map)
print("comfy_lora_keys_total", len(lora))
print("comfy_lora_modules_mapped", len(patches))
print("comfy_lora_keys_not_loaded", len(lost))
for m in lost[:5]:
    print("#", m)
"""


def comfy_python() -> Path | None:
    """ComfyUI's own interpreter ($COMFYUI_PATH or ~/ComfyUI, its .venv), when present."""
    root = Path(os.environ.get("COMFYUI_PATH") or Path.home() / "ComfyUI").expanduser()
    py = root / ".venv" / "bin" / "python"
    return py if (root / "comfy" / "lora.py").is_file() and py.is_file() else None


def check_comfy(lora_path: Path) -> dict[str, int] | None:
    """ComfyUI's LoRA key map on a true-shape SDXL (meta device), run under ComfyUI's python."""
    py = comfy_python()
    if py is None:
        return None
    out = subprocess.run([str(py), "-c", COMFY_CHECK, str(REPO / "tests" / "comfy"), str(lora_path)],
                         capture_output=True, text=True, timeout=600)
    values = {}
    for line in out.stdout.splitlines():
        if line.startswith("#"):
            print(line)
        elif line.startswith("comfy_"):
            name, value = line.split()
            values[name] = int(value)
    if out.returncode != 0 or "comfy_lora_keys_not_loaded" not in values:
        print(out.stderr[-3000:], file=sys.stderr)
        values["comfy_check_failed"] = 1
    return values


# ------------------------------------------------------------------------------ the run
def tokenizer_folder(work: Path, tiny: bool) -> Path:
    """ComfyUI's CLIP tokenizer (the real 49408-entry BPE) when found, else the tiny BPE of dco_train.tiny."""
    from dco_train.tiny import write_tokenizer_files

    if not tiny:
        root = Path(os.environ.get("COMFYUI_PATH") or Path.home() / "ComfyUI").expanduser()
        real = root / "comfy" / "sd1_tokenizer"
        if (real / "vocab.json").is_file() and (real / "merges.txt").is_file():
            return real
    return write_tokenizer_files(work / "tokenizer")


def write_dataset(folder: Path, size: int, n: int = 2) -> Path:
    """A few coloured images with captions naming `<obj>`."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (40 + 80 * i, 120, 200 - 60 * i))
        ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(230, 200, 30 * i))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("a photo of <obj>", encoding="utf-8")
    return folder


def train_command(ckpt: Path, data: Path, out: Path, tok: Path, resolution: int, steps: int,
                  mixed_precision: str = "bf16") -> list[str]:
    return [sys.executable, "-m", "dco_train", "train", "--pretrained_model_name_or_path", str(ckpt),
            "--tokenizer_dir", str(tok), "--data_dir", str(data), "--output_dir", str(out),
            "--preset", "subject", "--tokens", "<obj>=toy", "--train_text_encoder_ti", "--rank", "32",
            "--resolution", str(resolution), "--max_train_steps", str(steps), "--mixed_precision", mixed_precision,
            "--cpu", "--checkpointing_steps", "0", "--drift_every", "0", "--validation_every", "0",
            "--report_to", "none", "--no_progress"]


def run_training(cmd: list[str], engine: Path = REPO) -> dict[str, float]:
    """Run the CLI; its peak RSS comes from RUSAGE_CHILDREN (the first child this process waits for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.time()
    proc = subprocess.run(cmd, cwd=str(engine), text=True, capture_output=True)
    wall = time.time() - t
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        print(proc.stdout[-2000:])
        raise SystemExit(f"training failed (exit {proc.returncode})")
    return {"cpu_run_train_s": round(wall, 1), "cpu_run_peak_rss_gib": round(peak_kib / 2**20, 2),
            "rss_trustworthy": int(before <= peak_kib)}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=256, help="training resolution (default: 256)")
    ap.add_argument("--steps", type=int, default=2, help="DCO steps (default: 2)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model through the same path (seconds)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the checkpoint and run in this folder")
    ap.add_argument("--mixed-precision", default="bf16", help="the CLI's --mixed_precision (default: bf16)")
    ap.add_argument("--engine", type=Path, default=REPO,
                    help="the checkout whose `python -m dco_train` trains (default: this one), e.g. another branch's export")
    ap.add_argument("--no-comfy", action="store_true", help="skip the ComfyUI key-map check")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="dco-sdxl-cpu-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"cpu_run_resolution": args.resolution, "cpu_run_tiny": int(args.tiny),
                               "cpu_run_mixed_precision": args.mixed_precision}
    failures: list[str] = []
    try:
        tok = tokenizer_folder(work, args.tiny)
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(tok))
        vocab = CLIP_VOCAB if not args.tiny else len(tokenizer)
        if len(tokenizer) > vocab:
            raise SystemExit(f"the tokenizer at {tok} has {len(tokenizer)} entries, more than the CLIPs' {vocab} rows")
        modules = meta_modules(args.tiny, vocab, tokenizer.eos_token_id)
        ckpt = work / ("tiny_sdxl_random.safetensors" if args.tiny else "sdxl_base_random_bf16.safetensors")
        t = time.time()
        size = write_random_checkpoint(ckpt, sgm_shapes(modules))
        results.update(cpu_run_write_s=round(time.time() - t, 1), checkpoint_gib=round(size / 2**30, 2))
        results.update(check_conversion(ckpt, tokenizer.eos_token_id))
        if results["sgm_keys_loaded"] != results["sgm_keys_total"]:
            failures.append("not every key of the checkpoint was loaded")

        out = work / "run"
        data = write_dataset(work / "data", args.resolution)
        cmd = train_command(ckpt, data, out, tok, args.resolution, args.steps, args.mixed_precision)
        print(f"# (in {args.engine}) " + " ".join(cmd), flush=True)
        results.update(run_training(cmd, args.engine.resolve()))
        lora = find_lora(out)
        results.update(check_lora(lora, modules[0]))
        if results["lora_missing"] or results["lora_modules"] < results["sdxl_attention_projections"]:
            failures.append("the LoRA misses attention projections")
        if not args.tiny and not args.no_comfy:
            comfy = check_comfy(lora)
            if comfy is None:
                print("# ComfyUI not found: key-map check skipped")
            else:
                results.update(comfy)
                if comfy.get("comfy_check_failed") or comfy.get("comfy_lora_keys_not_loaded"):
                    failures.append("ComfyUI did not load every LoRA key")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        results["cpu_run_wall_s"] = round(time.time() - t0, 1)
        for name, value in results.items():
            print(name, value, flush=True)
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
