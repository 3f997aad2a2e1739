"""The memory and compute budget of a DCO training step at true SDXL base shapes, on fake tensors.

    python bench/sdxl_budget.py            # a few minutes on a CPU; no weights are allocated
    python bench/sdxl_budget.py --quick    # 1024² only
    python bench/sdxl_budget.py --run-cpu  # the real true-shape CPU run (bench/sdxl_cpu_run.py)

Runs the engine's own step (`dco_train.step.dco_errors` with `dco_train.lora.add_lora`) forward and
backward under FakeTensorMode (see dco_train/budget.py for what is measured and how). Measured: bf16,
AdamW, batch 1, for every preset × resolution × checkpointing × DCO/plain. Derived exactly from those
(marked `derived`); FLOPs at 1024² only (other rows: –), and the plain step's
memory is the DCO step's (the reference pass runs without gradient and keeps nothing): fp16 (same bytes as bf16), fp32 (bytes ×2), 8-bit AdamW (state analytic), batch 2
(activations and FLOPs ×2). Prints `name value` lines, then one Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dco_train.budget import GIB, Settings, derive, forward_flops, measure_step

PRESETS = {"subject": dict(ti=True, rank=32), "style": dict(ti=False, rank=64)}
# dense bf16 tensor peaks (no sparsity), from the vendors' data sheets
PEAK_TFLOPS = {"h100_sxm": 989.0, "h200": 989.0, "rtx4090": 165.2}  # 4090: bf16 with fp32 accumulate


def run_cpu() -> None:
    path = Path(__file__).with_name("sdxl_cpu_run.py")
    if not path.is_file():
        print(f"{path.name} is missing: the true-shape CPU run is not available in this checkout.")
        return
    spec = importlib.util.spec_from_file_location("sdxl_cpu_run", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        print(f"{path.name} has no main().")
        return
    module.main()


VALIDATE = dict(resolution=256, rank=64, ti=False, checkpointing=False, dtype="fp32")


def _current_rss_kib() -> int | None:
    """The resident set now (Linux). The baseline must be this, not the high-water mark so far:
    importing torch and diffusers peaks above where it settles, and that peak would be subtracted
    from the step's."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def estimator_child() -> None:
    """The real step the estimator is checked against: the mid-size UNet in fp32 on the CPU, the
    engine's step forward + backward and one AdamW step. Prints the RSS high-water mark beyond the
    baseline taken before the model is built."""
    import resource

    import torch
    from diffusers import UNet2DConditionModel

    from dco_train.budget import MID_UNET
    from dco_train.lora import UNET_TARGETS, add_lora
    from dco_train.step import dco_errors
    from dco_train.text import PromptEmbeds

    torch.manual_seed(0)
    base_kib = _current_rss_kib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = Settings(**VALIDATE)
    unet = UNet2DConditionModel(**MID_UNET).requires_grad_(False)
    params = add_lora(unet, s.rank, s.rank, UNET_TARGETS)
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    lat = s.resolution // 8
    x, target = torch.randn(1, 4, lat, lat), torch.randn(1, 4, lat, lat)
    t, ids = torch.randint(0, 1000, (1,)), torch.randn(1, 6)
    emb = PromptEmbeds(torch.randn(1, 77, 2048), torch.randn(1, 1280))
    for _ in range(2):  # the second step runs with the optimizer state in place, as every later one does
        err, _ = dco_errors(unet, x, t, target, ids, emb, lambda: emb, True)
        err.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) * 1024)


def estimator_over_measured(repeats: int = 3) -> float:
    """The estimate over the median of `repeats` measured child runs (RSS is noisy on a shared machine)."""
    import os
    import statistics
    import subprocess

    from dco_train.budget import MID_UNET

    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--estimator-child"], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        runs.append(int(out.stdout.strip().splitlines()[-1]))
    measured = statistics.median(runs)
    est = measure_step(Settings(**VALIDATE), unet_config=MID_UNET, flops=False).peak
    print(f"estimator_mid_estimated_gib {est / GIB:.3f}")
    print(f"estimator_mid_measured_rss_gib {measured / GIB:.3f}")
    print(f"estimator_mid_measured_rss_spread_gib {min(runs) / GIB:.3f}-{max(runs) / GIB:.3f}")
    return est / measured


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1024² only")
    p.add_argument("--run-cpu", action="store_true", help="run bench/sdxl_cpu_run.py instead")
    p.add_argument("--validate-only", action="store_true",
                   help="only the estimator check: estimate vs measured RSS of a real mid-size CPU step")
    p.add_argument("--estimator-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.estimator_child:
        estimator_child()
        return
    if args.validate_only:
        print(f"estimator_over_measured {estimator_over_measured():.3f}")
        return
    if args.run_cpu:
        run_cpu()
        return
    t0 = time.perf_counter()
    resolutions = (1024,) if args.quick else (1024, 768, 512)
    measured: dict[tuple, tuple[Settings, object]] = {}
    for preset, kw in PRESETS.items():
        for res in resolutions:
            for ckpt in (True, False):
                for ref in (True, False):
                    s = Settings(resolution=res, checkpointing=ckpt, reference=ref, **kw)
                    # the plain step's memory is the DCO step's (its reference pass keeps nothing): FLOPs only
                    measured[(preset, res, ckpt, ref)] = (s, measure_step(s, memory=ref, flops=res == 1024))
                    print(f"# measured {preset} {res} ckpt={ckpt} dco={ref} in {time.perf_counter() - t0:.0f} s",
                          file=sys.stderr, flush=True)
    rows = []
    for (preset, res, ckpt, ref), (s, b) in measured.items():
        if not ref:
            continue
        plain = measured[(preset, res, ckpt, False)][1]
        for dtype in ("bf16", "fp16", "fp32"):
            for opt in ("adamw", "adamw8bit"):
                for batch in (1, 2):
                    want = Settings(resolution=res, checkpointing=ckpt, dtype=dtype, optimizer=opt, batch=batch,
                                    **PRESETS[preset])
                    d = derive(b, s, want)
                    dp = derive(plain, s, want)
                    exact = dtype == "bf16" and opt == "adamw" and batch == 1
                    rows.append((preset, res, ckpt, dtype, opt, batch, d, dp, "measured" if exact else "derived"))
    key = {(r[0], r[1], r[2], r[3], r[4], r[5]): r for r in rows}
    sub = key[("subject", 1024, True, "bf16", "adamw", 1)][6]
    sty = key[("style", 1024, True, "bf16", "adamw", 1)][6]
    print(f"subject_1024_bf16_ckpt_adamw_peak_gib {sub.peak / GIB:.2f}")
    print(f"style_1024_bf16_ckpt_adamw_peak_gib {sty.peak / GIB:.2f}")
    # the node's and the CLI's defaults: gradient checkpointing on, bf16 (auto on a bf16 GPU), AdamW, batch 1
    print(f"default_subject_1024_peak_gib {sub.peak / GIB:.2f}")
    print(f"default_style_1024_peak_gib {sty.peak / GIB:.2f}")
    for ckpt, name in ((True, "ckpt"), (False, "nockpt")):
        for preset in PRESETS:
            d, pl = measured[(preset, 1024, ckpt, True)][1], measured[(preset, 1024, ckpt, False)][1]
            print(f"dco_over_plain_flops_{name}_{preset} {d.flops / pl.flops:.3f}")
        d, pl = measured[("style", 1024, ckpt, True)][1], measured[("style", 1024, ckpt, False)][1]
        print(f"dco_over_plain_flops_{name} {d.flops / pl.flops:.3f}")
    f_off, f_on = forward_flops(1024, 1, lora=False), forward_flops(1024, 1, lora=True)
    print(f"unet_forward_tflops_1024 {f_off / 1e12:.3f}")
    print(f"rg_over_cfg_flops_1024 {(2 * f_off + f_on) / (2 * f_on):.3f}")
    print(f"estimator_over_measured {estimator_over_measured():.3f}")
    for preset, b in (("subject", sub), ("style", sty)):
        for gpu, tf in PEAK_TFLOPS.items():
            print(f"{preset}_1024_ckpt_step_s_lower_bound_{gpu} {b.flops / (tf * 1e12):.3f}")
    print(f"wall_s {time.perf_counter() - t0:.0f}")
    print()
    print("Estimates (fake tensors; `derived` rows scaled exactly from measured ones). GiB; TFLOP per step "
          f"(forward + backward); lower-bound step time at dense bf16 peak: H100/H200 {PEAK_TFLOPS['h100_sxm']:.0f}, "
          f"RTX 4090 {PEAK_TFLOPS['rtx4090']:.0f} TFLOPS.")
    print()
    print("| preset | res | ckpt | dtype | optimizer | batch | peak | weights | LoRA+TI+grads | optim state | activations "
          "| TFLOP DCO | TFLOP plain | DCO÷plain | H100 s | 4090 s | source |")
    print("|" + "---|" * 17)

    def flops(f: float) -> str:
        return f"{f / 1e12:.1f}" if f else "–"

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.3f}" if a and b else "–"

    def secs(f: float, gpu: str) -> str:
        return f"{f / (PEAK_TFLOPS[gpu] * 1e12):.3f}" if f else "–"

    for preset, res, ckpt, dtype, opt, batch, d, dp, src in rows:
        print(f"| {preset} | {res} | {'on' if ckpt else 'off'} | {dtype} | {opt} | {batch} | {d.peak / GIB:.2f} | "
              f"{d.weights / GIB:.2f} | {d.trainable / GIB:.2f} | {d.optimizer_state / GIB:.2f} | {d.activations / GIB:.2f} | "
              f"{flops(d.flops)} | {flops(dp.flops)} | {ratio(d.flops, dp.flops)} | "
              f"{secs(d.flops, 'h100_sxm')} | {secs(d.flops, 'rtx4090')} | {src} |")


if __name__ == "__main__":
    main()
