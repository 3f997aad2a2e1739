"""Time a DCO training step against the plain-loss step (beta <= 0, no reference pass), side by side.

    python bench/train_step.py                          # tiny model, CPU
    python bench/train_step.py --device cuda --sdxl-shapes --resolution 1024

Both kinds of step run on one trainer (the same model, LoRA and data), interleaved in rounds, so a
noisy machine slows both alike. Prints `name value` lines; the goal is dco_over_plain <= 1.35.
With `--mid` it also prints the FLOP ratio that `dco_train.budget` counts (on fake tensors, the
engine's own step) for the same UNet config, resolution, batch, rank, TI and checkpointing, and
`measured_over_flop_ratio`: on this compute-bound model the measured ratio should be within 5% of it.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dco_train.budget import MID_UNET, SDXL_UNET, Settings, default_dtype, measure_step  # noqa: E402
from dco_train.config import TrainConfig  # noqa: E402
from dco_train.data import latents_from_tensors  # noqa: E402
from dco_train.train import RunOptions, _Trainer  # noqa: E402

def sdxl_components(tokenizer_dir: Path, unet_config: dict = SDXL_UNET, device: str = "cpu",
                    dtype: torch.dtype | None = None):
    """SDXL shapes (real UNet 2.6 B params, or the mid layout; CLIP-L, CLIP-G) with random weights; no VAE.

    The modules are built directly on `device` in `dtype` (default: fp32), so a GPU run never holds an
    fp32 host copy of the 2.6 B UNet."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dco_train.models import SDXL_SCHEDULER, SDXLComponents
    from dco_train.text import fix_eos_pooling
    from dco_train.tiny import build_tokenizer

    tok, tok2 = build_tokenizer(tokenizer_dir), build_tokenizer(tokenizer_dir, pad_token="!")
    common = dict(vocab_size=49408, max_position_embeddings=77, eos_token_id=tok.eos_token_id)
    with torch.device(device), default_dtype(dtype or torch.float32):  # the scheduler's tables stay on the CPU
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, hidden_act="quick_gelu", **common))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                         num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                                         **common))
        unet = UNet2DConditionModel(**unet_config)
    for t, e in ((tok, te), (tok2, te2)):
        fix_eos_pooling(e, t)
    return SDXLComponents(unet, None, te, te2, tok, tok2, EulerDiscreteScheduler(**SDXL_SCHEDULER))


def build_trainer(shape: str, preset: str, device: str, resolution: int | None, batch: int, ti: bool,
                  checkpointing: bool, tmp: Path, dtype: torch.dtype | None = None) -> _Trainer:
    """The engine's `_Trainer` on random weights of `shape` ("tiny", "mid" or "sdxl-shapes") with the
    `preset`'s settings ("subject" or "style"), on latents made up at `resolution`; no VAE, no files."""
    if shape == "tiny":
        from dco_train.tiny import build_tiny_sdxl

        comps, res = build_tiny_sdxl(seed=0, tokenizer_dir=tmp / "tok"), resolution or 64
    else:
        comps = sdxl_components(tmp / "tok", SDXL_UNET if shape == "sdxl-shapes" else MID_UNET, device, dtype)
        res = resolution or (1024 if shape == "sdxl-shapes" else 256)
    lat = res // 8
    n = 4
    data = latents_from_tensors(
        [torch.randn(4, lat, lat) for _ in range(n)], [f"a photo of a <obj> number {i}" for i in range(n)],
        [f"a photo of a toy number {i}" for i in range(n)], [torch.tensor([res, res, 0, 0, res, res]).float()] * n,
        tokens={"<obj>": "toy"},
    )
    make = TrainConfig.subject if preset == "subject" else TrainConfig.style
    cfg = make(
        tokens={"<obj>": "toy"} if ti else {}, train_text_encoder_ti=ti, resolution=res, max_train_steps=10**6,
        train_batch_size=batch, checkpointing_steps=0, drift_every=0, gradient_checkpointing=checkpointing,
        mixed_precision="auto",
    )
    return _Trainer(cfg, comps, RunOptions(output_dir=tmp / f"out-{preset}-{int(checkpointing)}", progress_bar=False,
                                           log_with=None, cpu=device == "cpu"), data)


def timed_steps(trainer: _Trainer, beta: float, steps: int) -> float:
    """Seconds per optimizer step of the trainer's own step (DCO for beta > 0, plain for beta <= 0)."""
    cuda = trainer.device.type == "cuda"
    trainer.cfg.dco_beta = beta
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        trainer._optimizer_step()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


def budget_flop_ratio(cfg: TrainConfig, unet_config: dict) -> tuple[float, float, float]:
    """(DCO FLOPs, plain FLOPs, their ratio) per step by the budget, for the trainer's own settings.

    FLOPs do not depend on the dtype or optimizer, so bf16 fake tensors stand in for any precision."""
    s = Settings(resolution=cfg.resolution, rank=cfg.rank, ti=bool(cfg.train_text_encoder_ti),
                 checkpointing=bool(cfg.gradient_checkpointing), dtype="bf16", batch=cfg.train_batch_size)
    dco = measure_step(s, unet_config=unet_config, memory=False).flops
    plain = measure_step(Settings(**{**s.__dict__, "reference": False}), unet_config=unet_config, memory=False).flops
    return dco, plain, dco / plain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sdxl-shapes", action="store_true", help="real SDXL sizes with random weights")
    p.add_argument("--mid", action="store_true", help="SDXL layout at 128 base channels: compute-bound on a CPU")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 64 tiny, 1024 SDXL)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="steps of each kind per round")
    p.add_argument("--ti", action="store_true", help="train tokens too (subject recipe)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="dco-bench-"))
    shape = "sdxl-shapes" if args.sdxl_shapes else "mid" if args.mid else "tiny"
    trainer = build_trainer(shape, "subject", args.device, args.resolution, args.batch, args.ti,
                            args.gradient_checkpointing, tmp)
    cfg, res = trainer.cfg, trainer.cfg.resolution
    cuda = trainer.device.type == "cuda"

    def timed(beta: float) -> float:
        return timed_steps(trainer, beta, args.steps)

    timed(1000.0), timed(0.0)  # warm-up (allocator, kernels)
    dco, plain, peak = [], [], {}
    for _ in range(args.rounds):
        for beta, out in ((1000.0, dco), (0.0, plain)):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out.append(timed(beta))
            if cuda:
                peak[beta] = max(peak.get(beta, 0), torch.cuda.max_memory_allocated() / 2**20)
    d, pl = statistics.median(dco), statistics.median(plain)
    print(f"device {trainer.device} {shape} {res}px batch {args.batch} "
          f"mixed_precision {trainer.mp} ti {args.ti}", file=sys.stderr)
    ratios = [a / b for a, b in zip(dco, plain)]  # within a round: neighbouring runs share the machine's load
    print(f"dco_over_plain {d / pl:.3f}")
    print(f"dco_over_plain_rounds_min {min(ratios):.3f}")
    print(f"dco_over_plain_rounds_max {max(ratios):.3f}")
    print(f"dco_step_ms {d * 1000:.1f}")
    print(f"plain_step_ms {pl * 1000:.1f}")
    if cuda:
        print(f"peak_mem_mb_dco {peak[1000.0]:.0f}")
        print(f"peak_mem_mb_plain {peak[0.0]:.0f}")
    else:
        print(f"peak_rss_mb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
    if args.mid or args.sdxl_shapes:
        t0 = time.perf_counter()
        f_dco, f_plain, flop_ratio = budget_flop_ratio(cfg, MID_UNET if args.mid else SDXL_UNET)
        print(f"budget_dco_tflops {f_dco / 1e12:.3f}")
        print(f"budget_plain_tflops {f_plain / 1e12:.3f}")
        print(f"budget_dco_over_plain_flops {flop_ratio:.3f}")
        print(f"measured_over_flop_ratio {d / pl / flop_ratio:.3f}")
        print(f"budget_count_s {time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()
