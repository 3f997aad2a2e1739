"""Time a DCO training step against the plain-loss step (beta <= 0, no reference pass), side by side.

    python bench/train_step.py                          # tiny model, CPU
    python bench/train_step.py --device cuda --sdxl-shapes --resolution 1024

Both kinds of step run on one trainer (the same model, LoRA and data), interleaved in rounds, so a
noisy machine slows both alike. Prints `name value` lines; the goal is dco_over_plain <= 1.35.
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

from dco_train.config import TrainConfig  # noqa: E402
from dco_train.data import latents_from_tensors  # noqa: E402
from dco_train.train import RunOptions, _Trainer  # noqa: E402

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


MID_UNET = dict(  # SDXL's block layout at 128 base channels and real conditioning widths (~130 M params)
    SDXL_UNET, block_out_channels=(128, 256, 512), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
)


def sdxl_components(tokenizer_dir: Path, unet_config: dict = SDXL_UNET):
    """SDXL shapes (real UNet 2.6 B params, or the mid layout; CLIP-L, CLIP-G) with random weights; no VAE."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dco_train.models import SDXL_SCHEDULER, SDXLComponents
    from dco_train.text import fix_eos_pooling
    from dco_train.tiny import build_tokenizer

    tok, tok2 = build_tokenizer(tokenizer_dir), build_tokenizer(tokenizer_dir, pad_token="!")
    common = dict(vocab_size=49408, max_position_embeddings=77, eos_token_id=tok.eos_token_id)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, hidden_act="quick_gelu", **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                     num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                                                     **common))
    for t, e in ((tok, te), (tok2, te2)):
        fix_eos_pooling(e, t)
    unet = UNet2DConditionModel(**unet_config)
    return SDXLComponents(unet, None, te, te2, tok, tok2, EulerDiscreteScheduler(**SDXL_SCHEDULER))


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
    if args.sdxl_shapes or args.mid:
        comps = sdxl_components(tmp / "tok", SDXL_UNET if args.sdxl_shapes else MID_UNET)
        res = args.resolution or (1024 if args.sdxl_shapes else 256)
    else:
        from dco_train.tiny import build_tiny_sdxl

        comps, res = build_tiny_sdxl(seed=0, tokenizer_dir=tmp / "tok"), args.resolution or 64
    lat = res // 8
    n = 4
    data = latents_from_tensors(
        [torch.randn(4, lat, lat) for _ in range(n)], [f"a photo of a <obj> number {i}" for i in range(n)],
        [f"a photo of a toy number {i}" for i in range(n)], [torch.tensor([res, res, 0, 0, res, res]).float()] * n,
        tokens={"<obj>": "toy"},
    )
    cfg = TrainConfig.subject(
        tokens={"<obj>": "toy"} if args.ti else {}, train_text_encoder_ti=args.ti, resolution=res, max_train_steps=10**6,
        train_batch_size=args.batch, checkpointing_steps=0, drift_every=0, gradient_checkpointing=args.gradient_checkpointing,
        mixed_precision="auto",
    )
    trainer = _Trainer(cfg, comps, RunOptions(output_dir=tmp / "out", progress_bar=False, log_with=None,
                                              cpu=args.device == "cpu"), data)
    cuda = trainer.device.type == "cuda"

    def timed(beta: float) -> float:
        trainer.cfg.dco_beta = beta
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            trainer._optimizer_step()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / args.steps

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
    shape = "sdxl-shapes" if args.sdxl_shapes else "mid" if args.mid else "tiny"
    print(f"device {trainer.device} {shape} {res}px batch {args.batch} "
          f"mixed_precision {trainer.mp} ti {args.ti}", file=sys.stderr)
    print(f"dco_over_plain {d / pl:.3f}")
    print(f"dco_step_ms {d * 1000:.1f}")
    print(f"plain_step_ms {pl * 1000:.1f}")
    if cuda:
        print(f"peak_mem_mb_dco {peak[1000.0]:.0f}")
        print(f"peak_mem_mb_plain {peak[0.0]:.0f}")
    else:
        print(f"peak_rss_mb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


if __name__ == "__main__":
    main()
