"""What one validation preview costs, in training steps, and the previews' share of a run at each
preset's defaults (the goal of TrainConfig's validation_every / validation_steps: at most ~5%).

    python bench/preview_cost.py --mid                  # SDXL layout at 128 channels, CPU
    python bench/preview_cost.py --device cuda --sdxl-shapes --resolution 1024

The engine's own trainer and preview renderer (`render_previews`, reward guidance at the config's
validation_steps), on random weights; the VAE decode is left out (no VAE). Prints `name value` lines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dco_train.config import TrainConfig  # noqa: E402
from dco_train.sample import render_previews  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import build_trainer, timed_steps  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sdxl-shapes", action="store_true", help="real SDXL sizes with random weights")
    p.add_argument("--mid", action="store_true", help="SDXL layout at 128 base channels: compute-bound on a CPU")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="training steps per round")
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dco-bench-"))
    shape = "sdxl-shapes" if args.sdxl_shapes else "mid" if args.mid else "tiny"
    tr = build_trainer(shape, "subject", args.device, args.resolution, 1, True, args.gradient_checkpointing, tmp)
    tr.cfg.validation_prompts = ["a photo of a <obj> on the beach"]
    cuda = tr.device.type == "cuda"

    def preview() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with tr.text_encoders_on_device():
            render_previews(tr.comps, tr.cfg, tr.token_set, tr.autocast, decode=lambda z: [])
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed_steps(tr, tr.cfg.dco_beta, 1), preview()  # warm-up
    steps, previews = [], []
    for _ in range(args.rounds):
        steps.append(timed_steps(tr, tr.cfg.dco_beta, args.steps))
        previews.append(preview())
    step_s, preview_s = statistics.median(steps), statistics.median(previews)
    equiv = preview_s / step_s
    print(f"device {tr.device} {shape} {tr.cfg.resolution}px checkpointing {args.gradient_checkpointing}", file=sys.stderr)
    print(f"train_step_s {step_s:.3f}")
    print(f"preview_s {preview_s:.3f}")
    print(f"validation_steps {tr.cfg.validation_steps}")
    print(f"preview_steps_equiv {equiv:.2f}")
    for name in ("subject", "style"):
        cfg = TrainConfig.preset_named(name, tokens={"<obj>": "toy"} if name == "subject" else {})
        n, every = cfg.max_train_steps, cfg.validation_every
        count = n // every + (1 if n % every else 0)  # and the last step, when it is not on the cadence
        print(f"{name}_preview_share_pct {100 * count * equiv / (n + count * equiv):.2f}")


if __name__ == "__main__":
    main()
