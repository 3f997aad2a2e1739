"""Host memory of the DCO Trainer node beyond what ComfyUI itself holds (issue 11, item 3).

Loads a checkpoint with ComfyUI's stock loader (`comfy.sd.load_checkpoint_guess_config`, as Load
Checkpoint does, under inference mode), resets the RSS high-water mark, trains `--steps` DCO steps
through the node, and prints the peak RSS beyond the loaded checkpoint. Run it in its own process
under ComfyUI's venv, e.g. with the slim real-layout SDXL (`../shared/tools/make_slim_sdxl.py`):

    ~/ComfyUI/.venv/bin/python bench/node_memory.py /tmp/slim_sdxl.safetensors
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "comfy"))


def rss_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--mixed_precision", default="no")
    args = ap.parse_args()

    import harness

    harness.import_comfy()
    import torch

    import comfy.sd
    import folder_paths

    trainer = harness.pack_module("nodes.trainer")
    from test_comfy_trainer import CAPTIONS, node_inputs, write_dataset

    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint)[:3]
    loaded = rss_gib("VmRSS")
    root = Path(tempfile.mkdtemp(prefix="dco-mem-"))
    for p in ("loras", "embeddings", "output"):
        (root / p).mkdir()
    folder_paths.set_output_directory(str(root / "output"))
    data = write_dataset(root / "subject", CAPTIONS, size=(args.resolution, args.resolution))
    reset_peak()
    start = time.perf_counter()
    with harness.model_folder("loras", root / "loras"), harness.model_folder("embeddings", root / "embeddings"):
        with torch.inference_mode():
            harness.call_node(trainer.DCOTrainer, model=model, clip=clip, vae=vae,
                              **node_inputs(data, steps=args.steps, resolution=args.resolution,
                                            mixed_precision=args.mixed_precision))
    peak = rss_gib("VmHWM")
    print(f"unet_params {sum(p.numel() for p in model.model.diffusion_model.parameters())}")
    print(f"comfy_unet_dtype {next(model.model.diffusion_model.parameters()).dtype}")
    print(f"comfy_clip_dtype {next(clip.cond_stage_model.parameters()).dtype}")
    print(f"rss_after_checkpoint_gib {loaded:.2f}")
    print(f"node_peak_rss_gib {peak:.2f}")
    print(f"node_peak_beyond_comfyui_gib {peak - loaded:.2f}")
    print(f"rss_after_node_gib {rss_gib('VmRSS'):.2f}")
    print(f"node_wall_s {time.perf_counter() - start:.1f}")


if __name__ == "__main__":
    main()
