"""The DCOTrainer node's overhead: set-up (conversion + latent encoding) and per-step time against
the engine alone on the same converted model and data. Needs ComfyUI (run it with ComfyUI's python):

    ~/ComfyUI/.venv/bin/python bench/trainer_node.py [--steps 20] [--rounds 2]

Both paths run the same engine loop; the node adds its callbacks (progress bar, websocket payloads,
cancel checks). The runs alternate, so a noisy machine slows both alike. Prints `name value` lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "comfy"))

import harness  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64)
    args = p.parse_args()
    if harness.why_unavailable():
        sys.exit(harness.why_unavailable())
    import torch

    import comfy.utils
    import folder_paths

    convert = harness.pack_module("nodes.convert")
    trainer = harness.pack_module("nodes.trainer")
    data_mod = harness.pack_module("dco_train.data")
    train_mod = harness.pack_module("dco_train.train")
    sys.path.insert(0, str(ROOT / "tests" / "comfy"))
    from test_comfy_trainer import CAPTIONS, node_inputs, write_dataset

    tmp = Path(tempfile.mkdtemp(prefix="dco-node-bench-"))
    dataset = write_dataset(tmp / "data", CAPTIONS * 2, size=(args.resolution + 16, args.resolution))
    with torch.inference_mode():
        model, clip, vae = harness.build_tiny_sdxl(seed=0)
    comfy.utils.set_progress_bar_global_hook(lambda *a, **k: None)  # a server's hook, minus the socket
    folder_paths.set_output_directory(str(tmp / "output"))
    inputs = node_inputs(dataset, steps=args.steps, resolution=args.resolution, checkpoint_every=0)
    cfg = trainer.build_config(dataset, **{**inputs, "mixed_precision": "no", "validation_every": 0})
    cfg.drift_every = 0
    spec = data_mod.load_dataset_spec(cfg)

    convert_s, encode_s, engine_step, node_step = [], [], [], []
    def run_engine(r: int) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            t0 = time.perf_counter()
            comps = convert.components_from_graph(model, clip, torch.device("cpu"))
            t1 = time.perf_counter()
            data = data_mod.encode_dataset(convert.vae_encoder(vae, model.model.latent_format), spec, cfg)
            t2 = time.perf_counter()
            res = train_mod.train(cfg, comps, train_mod.RunOptions(output_dir=tmp / f"engine{r}", progress_bar=False,
                                                                   log_with=None, cpu=True), data)
        convert_s.append(t1 - t0)
        encode_s.append(t2 - t1)
        engine_step.append(res.history[-1]["elapsed_s"] / args.steps)

    def run_node(r: int) -> None:
        with harness.model_folder("loras", tmp / f"loras{r}"), harness.model_folder("embeddings", tmp / f"emb{r}"):
            (tmp / f"loras{r}").mkdir()
            (tmp / f"emb{r}").mkdir()
            with torch.inference_mode():
                harness.call_node(trainer.DCOTrainer, model=model, clip=clip, vae=vae,
                                  **{**inputs, "output_name": f"bench{r}", "validation_every": 0})
        rows = [json.loads(line) for line in (tmp / "output" / "dco" / f"bench{r}" / "metrics.jsonl").read_text().splitlines()]
        node_step.append([row for row in rows if "loss" in row][-1]["elapsed_s"] / args.steps)

    for r in range(args.rounds):  # alternate which goes first, so warm-up and memory state favour neither
        for run in ((run_engine, run_node) if r % 2 == 0 else (run_node, run_engine)):
            run(r)
    comfy.utils.set_progress_bar_global_hook(None)
    best = min
    print(f"tiny SDXL, {len(CAPTIONS) * 2} images at {args.resolution}px, {args.steps} steps x {args.rounds} rounds",
          file=sys.stderr)
    print(f"setup_convert_s {best(convert_s):.3f}")
    print(f"setup_encode_s {best(encode_s):.3f}")
    print(f"engine_step_ms {best(engine_step) * 1000:.1f}")
    print(f"node_step_ms {best(node_step) * 1000:.1f}")
    print(f"node_over_engine {best(node_step) / best(engine_step):.3f}")


if __name__ == "__main__":
    main()
