"""What a run reports while it works: phases, Cancel, the metrics log, drift readings, previews and
the final per-image errors. The loop (`train.py`) does the work; this unit tells the caller about it.

Every unit of work (a model placed, an image encoded, a prompt cached, an optimizer step, a preview
sampling step, a file saved) ends with a phase report, `on_phase(label, done, total)`, and a Cancel
check. A Cancel during set-up or the final save raises `Cancelled`, which `train()` turns into a
stopped result with no final files; a Cancel during a preview ends the preview and stops the loop at
the end of that step, with a checkpoint, as a Cancel during a step does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

if TYPE_CHECKING:
    from .train import RunOptions, StepInfo

log = logging.getLogger(__name__)

# The phases a caller sees, in order; `on_phase(label, done, total)` counts the units of each.
LOADING = "Loading models"
PREPARING = "Preparing data"
CACHING = "Caching prompt embeddings"
TRAINING = "Training"
PREVIEW = "Rendering preview"
SAVING = "Saving"
PHASES = (LOADING, PREPARING, CACHING, TRAINING, PREVIEW, SAVING)

PER_IMAGE_TIMESTEPS = (200, 500, 800)  # the drift meter's; each image is scored at all of them
PER_IMAGE_SEED = 4321


class Cancelled(Exception):
    """Cancel was asked for where the run cannot stop with a checkpoint (set-up, the final save)."""


class Monitor:
    """Callbacks, the Cancel flag and the metrics log of one run, on every process.

    `stop_requested` agrees across processes (one small all-reduce), so it may only be called where
    every process calls it the same number of times: set-up and the end of each step. Work that runs
    on the main process alone (previews, the final save) reads `stop_seen_here` instead."""

    def __init__(self, run: "RunOptions", accelerator: Any):
        self.run, self.cb, self.acc = run, run.callbacks, accelerator
        self.is_main, self.world = accelerator.is_main_process, accelerator.num_processes
        self.history: list[dict[str, Any]] = []
        self.cancel_seen = False
        self.step_seconds: list[float] = []

    # ------------------------------------------------------------------ phases, status, Cancel
    def status(self, text: str) -> None:
        log.info(text)
        if self.cb.on_status:
            self.cb.on_status(text)

    def phase(self, label: str, done: int, total: int) -> None:
        if self.cb.on_phase:
            self.cb.on_phase(label, done, total)

    def stop_seen_here(self) -> bool:
        """Whether this process was asked to stop (no collective call)."""
        if not self.cancel_seen and self.cb.should_stop is not None and self.cb.should_stop():
            self.cancel_seen = True
        return self.cancel_seen

    def stop_requested(self) -> bool:
        """Whether any process was asked to stop (collective when there are several)."""
        flag = self.stop_seen_here()
        if self.world > 1:
            vec = self.acc.reduce(torch.tensor([float(flag)], device=self.acc.device), "sum")
            flag = bool(vec.item() > 0)
        return flag

    def check(self) -> None:
        """End of a set-up unit that every process runs: raise `Cancelled` if asked to stop."""
        if self.stop_requested():
            raise Cancelled()

    def unit_done(self, label: str) -> Callable[[int, int], None]:
        """A `(done, total)` progress function for a set-up phase: reports it, then checks Cancel."""

        def report(done: int, total: int) -> None:
            self.phase(label, done, total)
            self.check()

        return report

    # ------------------------------------------------------------------ the metrics log
    def log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.is_main:
            with open(self.run.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            if self.acc.log_with:
                self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def start_log(self) -> None:
        """A fresh run: forget an earlier run's log."""
        if self.is_main and self.run.log_path.exists():
            self.run.log_path.unlink()

    def restore_log(self, step: int) -> None:
        """A resumed run: keep the log's rows up to `step` (a crash may have written later ones)."""
        self.history = [h for h in read_log(self.run.log_path) if h.get("step", 0) <= step]
        if self.is_main:
            write_log(self.run.log_path, self.history)

    # ------------------------------------------------------------------ readings outside a step
    def metrics(self, values: dict[str, Any]) -> None:
        if self.cb.on_metrics:
            self.cb.on_metrics(values)

    def step_timed(self, seconds: float) -> None:
        """The time of one optimizer step (without drift, previews or saves): previews are priced in it."""
        self.step_seconds.append(seconds)

    def measure_drift(self, info: "StepInfo", drift: Any, text_models: Sequence[Any]) -> None:
        t0 = time.perf_counter()
        info.__dict__.update(drift.measure(text_models))
        info.drift_s = time.perf_counter() - t0  # what the meter cost (reported in the log)

    def preview(self, step: int, render: Callable[[Callable[[int, int], None]], list[Any]]) -> float | None:
        """Render the previews (main process), send them and their cost; returns the seconds they took.

        `render(on_step)` calls `on_step(done, total)` after every sampling step. A Cancel during
        the preview ends it there (nothing is sent) and is kept for the loop's next stop check."""

        def on_step(done: int, total: int) -> None:
            self.phase(PREVIEW, done, total)
            if self.stop_seen_here():
                raise Cancelled()

        t0 = time.perf_counter()
        try:
            images = render(on_step)
        except Cancelled:
            self.status(f"Preview at step {step} cancelled")
            return None
        seconds = time.perf_counter() - t0
        if self.cb.on_preview:
            self.cb.on_preview(step, images)
        mean = sum(self.step_seconds) / len(self.step_seconds) if self.step_seconds else None
        self.metrics({"step": step, "preview_s": seconds,
                      "preview_steps_equiv": seconds / mean if mean else None})
        return seconds


# ------------------------------------------------------------------------------- per-image error
@torch.no_grad()
def per_image_errors(
    unet: torch.nn.Module, items: Sequence[Any], prompt_embeds: Callable[[str], Any], base_embeds: Callable[[str], Any],
    scheduler: Any, prediction_type: str, autocast: Callable[[], Any] = contextlib.nullcontext,
    on_item: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Each training image's DCO error with the LoRA on (token prompt) and off (base prompt), as the
    loss sees them (`step.dco_errors`), averaged over `PER_IMAGE_TIMESTEPS` at fixed noises: which
    images the LoRA fits worst. Deterministic; no training RNG is consumed."""
    from .loss import diffusion_target
    from .step import dco_errors
    from .text import PromptEmbeds

    device = next(unet.parameters()).device
    g = torch.Generator().manual_seed(PER_IMAGE_SEED)
    t = torch.tensor(PER_IMAGE_TIMESTEPS, dtype=torch.long)
    k = len(PER_IMAGE_TIMESTEPS)
    was_training = unet.training
    unet.eval()
    rows = []
    try:
        for i, item in enumerate(items):
            x0 = item.mean.detach().float().cpu()[None].expand(k, *item.mean.shape)
            noise = torch.randn(x0.shape, generator=g)
            x_t = scheduler.add_noise(x0, noise, t).to(device)
            target = diffusion_target(noise, x0, t, scheduler, prediction_type).to(device)
            time_ids = item.time_ids.float()[None].repeat(k, 1).to(device)
            base = PromptEmbeds.cat([base_embeds(item.base_prompt)] * k)
            cond = PromptEmbeds.cat([prompt_embeds(item.prompt)] * k)
            err_lora, err_base = dco_errors(unet, x_t, t.to(device), target, time_ids, base, lambda: cond, True, autocast)
            name = Path(item.image_path).name if getattr(item, "image_path", None) else f"image {i + 1}"
            rows.append({"name": name, "err_lora": float(err_lora.mean()), "err_base": float(err_base.mean())})
            if on_item:
                on_item(i + 1, len(items))
    finally:
        unet.train(was_training)
    return rows


# ------------------------------------------------------------------------------- log files
def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a crash ends the log
    return rows


def write_log(path: Path, rows: list[dict[str, Any]]) -> None:
    from .formats import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"))
