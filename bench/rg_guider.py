"""Reward-guidance guider cost, measured side by side in one run (needs a ComfyUI checkout).

    $COMFYUI_PATH/.venv/bin/python bench/rg_guider.py [--device cuda] [--size 64] [--steps 4] [--repeats 5]

Prints one number per line:
  rg_over_cfg    our guider's step time / a stock CFGGuider step (same model, conds, latent).
                 The floor is three prompts in one batch (about 1.5); target <= 1.55, limit 1.6.
  hooks_over_rg  a whole sampling run, set-up included, of the stock graph that gives the same
                 result (DualCFGGuider + CreateHookLora/SetClipHooks) / ours. Must be >= 1.0.
  extra_mem_mb   memory our guider holds during sampling (device copies of the LoRA), against
                 which `hooks_mem_mb` shows the hook graph's weight backups and caches. Ours must
                 stay within 2x `lora_mb`, the LoRA's own size.
  floor_over_cfg three prompts in one batch without any LoRA (DualCFGGuider) / CFG: the
                 least any reward-guidance guider can cost, for reading rg_over_cfg;
                 rg_over_floor is ours / that floor.
  window_over_rg a whole run of ours with reward guidance only over `--window` (default the first
                 half of the schedule, plain CFG of model_ft outside it) / ours on every step, in
                 process CPU time (with OMP_NUM_THREADS=1 the load of other processes cancels);
                 window_over_rg_min / _max give the spread over rounds, window_rg_steps how many
                 of the steps fall inside the window, window_expected the pass-count estimate
                 (1 - the share of skipped third passes).
The model is feasibility.md's "mid" SDXL layout (~127 M parameters, real conditioning widths) with
a rank-32 attention LoRA, so compute dominates rather than Python overhead. The guiders run in
rounds, back to back; each ratio is the median over rounds of the ratio within a round.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "comfy"))
import harness  # noqa: E402

log = logging.getLogger("bench.rg_guider")


def tensor_mb(obj: Any) -> float:
    """MB of every tensor reachable through dicts, lists and tuples in `obj` (each counted once)."""
    import torch

    seen: set[int] = set()

    def walk(o: Any) -> int:
        if isinstance(o, torch.Tensor):
            if id(o) in seen:
                return 0
            seen.add(id(o))
            return o.numel() * o.element_size()
        if isinstance(o, dict):
            return sum(walk(v) for v in o.values())
        if isinstance(o, (list, tuple)):
            return sum(walk(v) for v in o)
        return 0

    return walk(obj) / 2**20


def random_cond(seed: int, layout: str, batch: int) -> list:
    import torch

    g = torch.Generator().manual_seed(seed)
    ctx = harness.LAYOUTS[layout]["context_dim"]
    pooled = harness.LAYOUTS[layout]["adm_in_channels"] - 6 * harness.TIME_EMBED
    return [[torch.randn(batch, 77, ctx, generator=g), {"pooled_output": torch.randn(batch, pooled, generator=g)}]]


class Runner:
    """Runs a guider and records per-step times (and, through `probe`, memory held mid-run)."""

    def __init__(self, model: Any, latent: Any, steps: int, device: str):
        import comfy.sample
        import comfy.samplers

        self.latent, self.device = latent, device
        self.noise = comfy.sample.prepare_noise(latent, 0)
        self.sampler = comfy.samplers.sampler_object("euler")
        self.sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", steps)

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def run(self, guider: Any, probe: Callable[[], None] | None = None) -> tuple[float, float, float]:
        """(median step time after the first step, whole run time, whole run process CPU time)."""
        stamps: list[float] = []

        def callback(step: int, *args: Any) -> None:
            self.sync()
            stamps.append(time.perf_counter())
            if probe is not None and step == 1:
                probe()

        self.sync()
        start, cpu = time.perf_counter(), time.process_time()
        guider.sample(self.noise, self.latent, self.sampler, self.sigmas, callback=callback, disable_pbar=True, seed=0)
        self.sync()
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
        return statistics.median(b - a for a, b in zip(stamps, stamps[1:])), total, cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--layout", choices=list(harness.LAYOUTS), default="mid")
    parser.add_argument("--size", type=int, default=64, help="latent side (64 = a 512 px image)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each guider once per round)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--fp16", action="store_true", help="store and compute the UNet in fp16 (GPU)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--window", type=float, nargs=2, default=(0.0, 0.5), metavar=("START", "END"),
                        help="rg_start rg_end of the windowed guider (fractions of the schedule)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    harness.import_comfy(cpu=device == "cpu")
    import comfy.hooks
    import comfy.model_management as mm
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG

    guider_mod = harness.pack_module("nodes.guider")
    bypass_mod = harness.pack_module("nodes.bypass")

    model = harness.build_model(args.layout, seed=0, dtype=torch.float16 if args.fp16 else None)
    with tempfile.TemporaryDirectory() as tmp:
        path = harness.save_engine_lora(Path(tmp) / "subject.safetensors", model, rank=args.rank, alpha=args.rank,
                                        seed=1, layout=args.layout)
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    model_ft, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    lora_mb = bypass_mod.lora_bytes(guider_mod.RewardGuidanceGuider(model, model_ft).extra) / 2**20

    token, base, neg = (random_cond(s, args.layout, 1) for s in (1, 2, 3))
    hooked_token = comfy.hooks.set_hooks_for_conditioning(token, comfy.hooks.create_hook_lora(lora, 1.0, 0.0))
    latent = torch.zeros(args.batch, 4, args.size, args.size)
    runner = Runner(model, latent, args.steps, device)

    def ours() -> Any:
        g = guider_mod.RewardGuidanceGuider(model, model_ft)
        g.set_conds(token, base, neg)
        g.set_cfg(7.5, 3.0)
        return g

    def window() -> Any:
        g = ours()
        g.set_window(*args.window, guider_mod.OUTSIDE_FT)
        return g

    def cfg() -> Any:
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(token, neg)
        g.set_cfg(7.5)
        return g

    def hooks() -> Any:
        g = Guider_DualCFG(model)
        g.set_conds(hooked_token, base, neg)
        g.set_cfg(3.0, 7.5)
        return g

    def floor() -> Any:  # three prompts in one batch, no LoRA: what any RG guider costs at least
        g = Guider_DualCFG(model)
        g.set_conds(token, base, neg)
        g.set_cfg(3.0, 7.5)
        return g

    guiders = (("cfg", cfg), ("ours", ours), ("window", window), ("hooks", hooks), ("floor", floor))

    mem: dict[str, float] = {}

    def probe_ours(g: Any) -> Callable[[], None]:
        return lambda: mem.__setitem__("ours", tensor_mb([d._cache for d in g._bypass._deltas]))

    def probe_hooks() -> None:
        mem["hooks"] = tensor_mb(model.hook_backup) + tensor_mb(list(model.cached_hook_patches.values()))

    for name, make in guiders:  # warm-up, once each
        runner.run(make())
    rounds: list[dict[str, tuple[float, float]]] = []
    for _ in range(args.repeats):  # one round = each guider once, back to back
        found = {}
        for name, make in guiders:
            g = make()
            probe = probe_ours(g) if name == "ours" else probe_hooks if name == "hooks" else None
            found[name] = runner.run(g, probe)
        rounds.append(found)
    mm.unload_all_models()

    def ratio(a: str, b: str, i: int) -> float:
        """Median over rounds of the ratio within each round: load from other processes on a
        shared machine drifts slowly, so a ratio of neighbouring runs cancels most of it."""
        return statistics.median(r[a][i] / r[b][i] for r in rounds)

    def ms(name: str) -> float:
        return statistics.median(r[name][0] for r in rounds) * 1e3

    print(f"rg_over_cfg {ratio('ours', 'cfg', 0):.3f}")
    print(f"hooks_over_rg {ratio('hooks', 'ours', 1):.3f}")
    print(f"extra_mem_mb {mem.get('ours', 0.0):.1f}")
    print(f"hooks_mem_mb {mem.get('hooks', 0.0):.1f}")
    print(f"lora_mb {lora_mb:.1f}")
    print(f"floor_over_cfg {ratio('floor', 'cfg', 0):.3f}")
    print(f"rg_over_floor {ratio('ours', 'floor', 0):.3f}")
    per_round = [r["window"][2] / r["ours"][2] for r in rounds]
    high, low = guider_mod.sigma_window(model.get_model_object("model_sampling"), *args.window)
    inside = sum(1 for s in runner.sigmas[:-1].tolist() if low <= s <= high)
    print(f"window_over_rg {statistics.median(per_round):.3f}")
    print(f"window_over_rg_min {min(per_round):.3f}")
    print(f"window_over_rg_max {max(per_round):.3f}")
    print(f"window_rg_steps {inside}")
    print(f"window_expected {(3 * inside + 2 * (args.steps - inside)) / (3 * args.steps):.3f}")
    print(f"# device {device}, layout {args.layout}, latent {args.batch}x4x{args.size}x{args.size}, rank {args.rank}, "
          f"{args.steps} euler steps, {args.repeats} rounds, {torch.get_num_threads()} threads; median step ms: "
          f"cfg {ms('cfg'):.0f}, ours {ms('ours'):.0f}, window {args.window[0]:g}-{args.window[1]:g} "
          f"{ms('window'):.0f}, dualcfg+hooks {ms('hooks'):.0f}, floor {ms('floor'):.0f}")


if __name__ == "__main__":
    main()
