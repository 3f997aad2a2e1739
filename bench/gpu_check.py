"""Everything worth measuring on one CUDA GPU, in one Markdown table (issue 11 item 5).

    python bench/gpu_check.py                   # true SDXL shapes, random bf16 weights, 1024², on CUDA
    python bench/gpu_check.py --peak-tflops 312 # a GPU not in the table below (its dense bf16 peak)
    python bench/gpu_check.py --smoke           # the same code path on the tiny model on the CPU (seconds)

For subject (TI, rank 32) and style (rank 64), gradient checkpointing on and off, it builds the
engine's own `_Trainer` (through `bench/train_step.py`'s `build_trainer`) on random weights made
directly on the device, and reports: the budget's estimated peak (`dco_train.budget.estimate`, what
the pre-flight prints) beside `torch.cuda.max_memory_allocated` over the timed steps, the median step
time (after warm-up, synchronised), and the model FLOP utilisation (the budget's FLOPs per step, from
`measure_step` on fake tensors, ÷ step time ÷ the GPU's dense bf16 peak). Then the engine's RG
denoiser (`dco_train.sample.RGDenoiser`, rg 3, cfg 7.5) against its CFG step (rg 0) at the same
resolution on the style model. Each case is guarded against out-of-memory, so one OOM keeps the table.
"""

from __future__ import annotations

import argparse
import gc
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import build_trainer, timed_steps  # noqa: E402

from dco_train import budget  # noqa: E402
from dco_train.errors import DCOError  # noqa: E402

GIB = 2**30
# dense bf16 tensor-core peaks (no sparsity), vendors' data sheets; matched against the device name
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("4090", 165.2))  # 4090: bf16 with fp32 accumulate
PRESETS = {"subject": True, "style": False}  # preset -> TI on
OOM = (torch.cuda.OutOfMemoryError,)  # a RuntimeError too; named first so the note says OOM


@dataclass
class Row:
    case: str
    est_gib: float | None = None
    max_alloc_gib: float | None = None
    step_ms: float | None = None
    tflop: float | None = None
    mfu: float | None = None
    note: str = ""


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((tf for key, tf in PEAK_TFLOPS if key.lower() in name.lower()), None)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def train_case(args: argparse.Namespace, preset: str, ckpt: bool, tmp: Path, peak: float | None) -> tuple[Row, Any]:
    """One trainer case; returns its row and the trainer (kept for the RG measurement, else dropped)."""
    row = Row(f"train {preset} ckpt {'on' if ckpt else 'off'}")
    cuda = args.device == "cuda"
    base = torch.cuda.memory_allocated() if cuda else 0
    trainer = build_trainer(args.shape, preset, args.device, args.resolution, 1, PRESETS[preset], ckpt, tmp,
                            dtype=torch.bfloat16 if cuda else None)
    settings = budget.settings_for(trainer.cfg, trainer.mp)
    text = tuple(enc.config.to_dict() for enc in trainer.comps.text_encoders)
    row.est_gib = budget.estimate(settings, trainer.comps.unet.config, text).peak / GIB
    beta = trainer.cfg.dco_beta
    timed_steps(trainer, beta, args.warmup)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [timed_steps(trainer, beta, 1) for _ in range(args.steps)]
    if cuda:
        row.max_alloc_gib = (torch.cuda.max_memory_allocated() - base) / GIB
    row.step_ms = statistics.median(times) * 1e3
    flops = budget.measure_step(settings, unet_config=dict(trainer.comps.unet.config), memory=False,
                                text_configs=text).flops
    row.tflop = flops / 1e12
    if peak:
        row.mfu = flops / (row.step_ms / 1e3) / (peak * 1e12)
    row.note = f"mp {trainer.mp}"
    return row, trainer


def rg_case(args: argparse.Namespace, trainer: Any) -> Row:
    """The engine's RG denoiser step ÷ its CFG step (rg 0), same model, resolution and latent."""
    from dco_train.sample import RGDenoiser, SampleSettings

    res = trainer.cfg.resolution
    unet = trainer.comps.unet
    unet.eval()
    x = torch.randn(1, 4, res // 8, res // 8, device=trainer.device)
    t = torch.tensor([500], device=trainer.device)
    ms = {}
    with torch.no_grad(), trainer.text_encoders_on_device():
        dens = {rg: RGDenoiser(trainer.comps, SampleSettings(prompt="a photo of a toy", rg=rg, width=res, height=res),
                               autocast=trainer.autocast) for rg in (0.0, 3.0)}
    with torch.no_grad():
        for rg, den in dens.items():
            den(x, t)  # warm-up
        for rg, den in dens.items():
            times = []
            for _ in range(args.steps):
                sync(args.device)
                t0 = time.perf_counter()
                den(x, t)
                sync(args.device)
                times.append(time.perf_counter() - t0)
            ms[rg] = statistics.median(times) * 1e3
    return Row(f"sample RG ÷ CFG {res}²", step_ms=ms[3.0],
               note=f"rg_over_cfg {ms[3.0] / ms[0.0]:.3f} (CFG step {ms[0.0]:.1f} ms)")


def _stop_at_the_limit(signum: int, frame: Any) -> None:
    raise TimeoutError("stopped by the time limit (SIGTERM)")


def failed(case: str, exc: BaseException) -> Row:
    """A case that did not finish keeps its row, with the reason, so the table still comes out."""
    kind = "OOM" if isinstance(exc, OOM) else type(exc).__name__
    return Row(case, note=f"{kind}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")


def fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the code path in seconds")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not H100/H200/4090")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 1024; 64 with --smoke)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (the median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    args.device, args.shape = ("cpu", "tiny") if args.smoke else ("cuda", "sdxl-shapes")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("No CUDA device: run on a GPU, or pass --smoke for the CPU check.")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = peak_tflops(name, args.peak_tflops)
    t_start = time.perf_counter()
    rows: list[Row] = []
    rg_row = Row("sample RG ÷ CFG", note="not run")
    signal.signal(signal.SIGTERM, _stop_at_the_limit)  # bench/gpu_check.sh's timeout: print what was measured
    try:
        with tempfile.TemporaryDirectory(prefix="dco-gpu-check-") as tmp:
            for preset in PRESETS:
                for ckpt in (True, False):
                    case = f"train {preset} ckpt {'on' if ckpt else 'off'}"
                    torch.manual_seed(0)
                    trainer = None
                    try:
                        row, trainer = train_case(args, preset, ckpt, Path(tmp), peak)
                    except (*OOM, RuntimeError, DCOError) as exc:  # one failing case (or a pre-flight refusal) keeps the table
                        row = failed(case, exc)
                    rows.append(row)
                    print(f"# {case} done at {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
                    if preset == "style" and ckpt and trainer is not None:  # the RG case runs on the style model
                        try:
                            rg_row = rg_case(args, trainer)
                        except (*OOM, RuntimeError, DCOError) as exc:
                            rg_row = failed("sample RG ÷ CFG", exc)
                    del trainer  # each trainer is dropped before the next one is built
                    free(args.device)
    except TimeoutError as exc:
        rows.append(failed("(rest)", exc))
    finally:
        rows.append(rg_row)
        report(rows, name, peak, time.perf_counter() - t_start)


def report(rows: list[Row], name: str, peak: float | None, wall: float) -> None:
    print(f"device {name}; peak bf16 {fmt(peak, '.1f')} TFLOPS; torch {torch.__version__}; wall {wall:.0f} s")
    print()
    print("| case | budget peak GiB | max_memory_allocated GiB | step ms (median) | TFLOP/step (budget) | MFU | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.case} | {fmt(r.est_gib, '.3g')} | {fmt(r.max_alloc_gib, '.2f')} | {fmt(r.step_ms, '.1f')} | "
              f"{fmt(r.tflop, '.3g')} | {fmt(r.mfu, '.1%')} | {r.note} |")


if __name__ == "__main__":
    main()
