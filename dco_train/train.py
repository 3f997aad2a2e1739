"""The DCO training loop (DESIGN 2), on accelerate.

`train(cfg, components, run)` trains a LoRA (and TI rows) on the given SDXL components and writes
the LoRA and embeddings files. One step, per micro-batch:

    x0 ~ cached latent distribution, ε ~ N(0, I) (+ offset noise), t ~ U{0..T-1}
    err_ref   = |ε_ref(x_t, t, c_base) - target|²   LoRA off, no gradient (skipped when β <= 0)
    err_model = |ε_θ(x_t, t, c) - target|²          LoRA on, TI rows spliced into c
    loss      = -log σ(-β (err_model - err_ref))

All randomness comes from one generator per process, and the data order is a function of
(seed, epoch); a checkpoint stores both, so resuming is exact. Several processes (`accelerate
launch`) each take their share of the global batch; gradients of the LoRA and TI rows are averaged
with one all-reduce, so no DDP wrapper is needed around a model that is run twice per step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from . import checkpoint as ckpt_io
from . import checkpointing
from .config import TrainConfig
from .data import TrainData, encode_dataset, load_dataset_spec, vae_encoder
from .drift import DriftMeter
from .errors import DCOError
from .formats import META_EMBEDDINGS, atomic_write, save_embeddings, save_lora, subject_metadata
from .lora import TEXT_TARGETS, UNET_TARGETS, add_lora
from .loss import diffusion_target, min_snr_weight
from .models import SDXLComponents
from .monitor import CACHING, LOADING, PREPARING, SAVING, TRAINING, Cancelled, Monitor, per_image_errors
from .order import DataOrder
from .outputs import PER_IMAGE_NAME
from .step import dco_step
from .text import PromptEmbeds, encode_prompts
from .ti import TokenSet, add_tokens

log = logging.getLogger(__name__)


@dataclass
class StepInfo:
    """What the loop reports after every optimizer step (callbacks, logs, the ComfyUI chart)."""

    step: int
    total: int
    loss: float
    err_model: float
    err_ref: float | None
    reward_gap: float | None
    lr: float
    elapsed_s: float
    eta_s: float
    drift: float | None = None
    fit: float | None = None
    drift_s: float | None = None
    preview_s: float | None = None  # what this step's previews cost (seconds)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Callbacks:
    on_step: Callable[[StepInfo], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_preview: Callable[[int, list[Any]], None] | None = None
    on_status: Callable[[str], None] | None = None
    # readings taken outside an optimizer step: the drift meter's step-0 baseline {"step": 0, "drift", "fit", ...}
    # and each preview's cost {"step", "preview_s", "preview_steps_equiv"} (seconds / mean training-step seconds)
    on_metrics: Callable[[dict[str, Any]], None] | None = None
    # (label, done, total) after every unit of work; the labels are monitor.PHASES
    on_phase: Callable[[str, int, int], None] | None = None


@dataclass
class RunOptions:
    """Per-run settings that are never saved with the config."""

    output_dir: Path
    lora_path: Path | None = None  # default output_dir / "lora.safetensors"
    embeddings_path: Path | None = None  # default output_dir / "embeddings.safetensors"
    resume: str | None = None  # "latest" or a checkpoint folder
    save_precision: str = "fp16"
    log_with: str | None = "auto"  # "tensorboard", None, or "auto" (tensorboard when installed)
    progress_bar: bool = True
    cpu: bool = False
    callbacks: Callbacks = field(default_factory=Callbacks)
    metadata: dict[str, str] = field(default_factory=dict)
    decode_latents: Callable[[torch.Tensor], list[Any]] | None = None  # previews; default: the components' VAE

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        self.lora_path = Path(self.lora_path) if self.lora_path else self.output_dir / "lora.safetensors"
        self.embeddings_path = Path(self.embeddings_path) if self.embeddings_path else self.output_dir / "embeddings.safetensors"

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"


@dataclass
class TrainResult:
    lora: Path | None
    embeddings: Path | None
    log: Path
    checkpoints: list[Path]
    step: int
    stopped: bool
    history: list[dict[str, Any]]
    components: SDXLComponents
    token_set: TokenSet | None
    # each training image's final error, LoRA on and off: {"name", "err_lora", "err_base"}
    per_image: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the dataset's (TrainData.warnings)


def resolve_mixed_precision(mixed_precision: str, cuda: bool) -> str:
    """`auto` -> bf16 on GPUs that have it, fp16 on other GPUs, no on the CPU."""
    if mixed_precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    if mixed_precision == "fp16" and not cuda:
        raise DCOError("fp16 mixed precision needs a CUDA GPU; use bf16 or no on the CPU.")
    return mixed_precision


def weight_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The dtype the frozen weights are kept in: the mixed-precision dtype (bf16 on any device, fp16
    on a GPU), else fp32. Only the LoRA and the TI rows train in fp32 (cf. diffusers'
    `cast_training_params`); autocast computes in the mixed-precision dtype either way, so an fp32
    copy of a frozen weight would only cost memory."""
    if mixed_precision == "bf16":
        return torch.bfloat16
    if mixed_precision == "fp16" and device.type == "cuda":
        return torch.float16
    return torch.float32


def _make_accelerator(cfg: TrainConfig, run: RunOptions):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    mp = resolve_mixed_precision(cfg.mixed_precision, torch.cuda.is_available() and not run.cpu)
    log_with = run.log_with
    if log_with == "auto":
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            log_with = None
    project = ProjectConfiguration(project_dir=str(run.output_dir), logging_dir=str(run.output_dir / "tensorboard"))
    # accelerate keeps its mixed-precision choice in a process-wide singleton; a long-lived process
    # (ComfyUI, the tests) runs several trainings with different settings, so start each afresh.
    # The distributed part (PartialState) is kept.
    _reset_accelerate_state()
    return Accelerator(mixed_precision=mp, cpu=run.cpu, log_with=log_with, project_config=project), mp


def _reset_accelerate_state() -> None:
    """Forget accelerate's process-wide mixed-precision state, keeping the distributed part.

    Private API (`AcceleratorState._reset_state`): accelerate has no public way to start a second
    `Accelerator` with other settings in one process; `accelerate.test_utils` resets the same way.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _flatten(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, Callable[[torch.Tensor], list[torch.Tensor]]]:
    """One flat buffer of `tensors`, and the function that splits a flat buffer back into views.

    Private API (`torch._utils._flatten_dense_tensors`), the helper DDP itself uses. The public
    alternatives cost more here: `torch.cat` of flattened tensors plus `split` + `view_as` by hand
    is the same code written twice, and `torch.nn.utils.parameters_to_vector` works on parameters,
    not on their gradients.
    """
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    return _flatten_dense_tensors(tensors), lambda flat: list(_unflatten_dense_tensors(flat, tensors))


def _share_lora_inputs(unet: torch.nn.Module, active: bool):
    """Under autocast, let each LoRA read its frozen layer's input as it is.

    peft casts the input to the fp32 LoRA weight's dtype, and autocast casts it straight back to
    bf16/fp16 for the matmul: a new half-precision copy of every attention input, which backward
    keeps alive. Without peft's cast, autocast casts only the small
    LoRA weights. Every UNet call of the loop (the step, the drift meter, the previews) runs under
    autocast; outside the loop peft's cast is back on.
    """
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(unet, active=active)


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen module, casting only if its dtype differs (a no-op keeps shared storage)."""
    p = next(module.parameters())
    if p.device != device:
        module.to(device)
    if p.dtype != dtype:
        module.to(dtype=dtype)


def _sync_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the trainable gradients across processes with one flat all-reduce."""
    if world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat, unflatten = _flatten(grads)
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, unflatten(flat)):
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


def nan_loss_message(loss: float, step: int, checkpoints: list[Path]) -> str:
    """What to say when the loss stops being finite: name the checkpoint that survives, if any."""
    kept = (f"The last checkpoint, {checkpoints[-1]}, is kept; resume from it with a lower learning rate."
            if checkpoints else "No checkpoint had been saved yet, so the run must start again.")
    return (f"The loss became {loss} at step {step}; lower the learning rate, or train in bf16 or fp32 instead "
            f"of fp16. {kept}")


class _Trainer:
    """One run's state; `train()` below is the public entry point. The step is `step.py`'s, the
    checkpoints `checkpointing.py`'s and the reports (phases, Cancel, log, previews) `monitor.py`'s."""

    def __init__(self, cfg: TrainConfig, comps: SDXLComponents, run: RunOptions, data: TrainData | None):
        self.cfg, self.comps, self.run = cfg, comps, run
        self.cb = run.callbacks
        if not run.output_dir.is_dir() and not run.output_dir.parent.is_dir():
            raise DCOError(
                f"The output folder's parent {run.output_dir.parent} does not exist; create it or choose another "
                "output folder."
            )
        self.acc, self.mp = _make_accelerator(cfg, run)
        self.device = self.acc.device
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.is_main = self.acc.is_main_process
        self.monitor = Monitor(run, self.acc)
        self.step = 0
        self.preflight()
        self.noise_scheduler = comps.training_scheduler(cfg.prediction_type)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.status("Preparing data")
        self.data = data if data is not None else self._encode_data()
        if not self.data.items:
            raise DCOError("The dataset is empty.")
        if cfg.train_text_encoder_ti and not self.data.tokens:
            self.data.tokens = dict(cfg.tokens)
        self.monitor.check()
        self.monitor.phase(LOADING, 0, 1)
        self._place_models()
        self.monitor.unit_done(LOADING)(1, 1)
        self.text_home = self.device
        self.status("Caching prompt embeddings")
        with torch.no_grad(), self.autocast():
            prompts = sorted({it.base_prompt for it in self.data.items} | {it.prompt for it in self.data.items})
            self.cache = {p: e.to(self.device) for p, e in zip(prompts, self._encode_each(prompts))}
        # The step needs the text encoders only when they (or their TI rows) train; otherwise they
        # wait in host memory, and the drift meter and the previews bring them back for a moment.
        self.text_home = self.device if cfg.train_text_encoder_ti or cfg.train_text_encoder_lora else torch.device("cpu")
        self._park_text_encoders()
        self.token_set: TokenSet | None = None
        params_ti: list[torch.nn.Parameter] = []
        if cfg.train_text_encoder_ti:
            self.token_set = add_tokens(comps.tokenizers, comps.text_encoders, self.data.tokens, seed=cfg.seed).attach()
            params_ti = self.token_set.parameters()
        self.params_unet = add_lora(comps.unet, cfg.rank, cfg.alpha, UNET_TARGETS, seed=cfg.seed)
        self.params_te: list[torch.nn.Parameter] = []
        if cfg.train_text_encoder_lora:
            for i, enc in enumerate(comps.text_encoders):
                self.params_te += add_lora(enc, cfg.rank, cfg.alpha, TEXT_TARGETS, seed=cfg.seed + 1 + i)
        self.needs_text_grad = bool(params_ti or self.params_te)
        self.trainable = self.params_unet + self.params_te + params_ti
        groups = [{"params": self.params_unet, "lr": cfg.learning_rate}]
        if self.params_te:
            groups.append({"params": self.params_te, "lr": cfg.text_encoder_lr})
        if params_ti:
            groups.append({"params": params_ti, "lr": cfg.text_encoder_lr})
        self.optimizer = self.acc.prepare_optimizer(self._optimizer(groups))
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler, optimizer=self.optimizer.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.max_train_steps, num_cycles=cfg.lr_num_cycles, power=cfg.lr_power,
        )
        if cfg.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
            if self.needs_text_grad:
                for enc in comps.text_encoders:
                    enc.gradient_checkpointing_enable()
                    enc.train()
        self.generator = torch.Generator().manual_seed(cfg.seed * 1009 + self.rank)
        self.order = DataOrder(self.data.bucket_groups(), cfg.train_batch_size * self.world, cfg.seed)
        self.checkpoints: list[Path] = []
        self.saved_step: int | None = None  # the step of the checkpoint this run saved last
        self.drift = None
        if cfg.drift_every:
            self.drift = DriftMeter(
                comps.unet, self._encode_batch, self.data.items, self.noise_scheduler, self.prediction_type,
                cfg.drift_prompts, autocast=self.autocast,
            )

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.monitor.history

    # ------------------------------------------------------------------ helpers
    def preflight(self) -> None:
        """Report the budget's memory estimate for these settings; on a GPU, refuse a run that cannot fit."""
        from . import budget

        settings = budget.settings_for(self.cfg, self.mp)
        text = tuple(enc.config.to_dict() for enc in self.comps.text_encoders)
        cuda = self.device.type == "cuda"
        try:  # SDXL base answers from a table; another UNet needs a fake-tensor run: only worth it on a GPU
            est = budget.estimate(settings, self.comps.unet.config, text, run=cuda)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:  # an unusual UNet: train anyway
            log.warning("No memory estimate for this UNet (%s).", exc)
            return
        if est is None:
            self.status(f"Memory estimate: weights {budget.frozen_bytes(self.comps, settings) / budget.GIB:.2f} GiB; "
                        "the full estimate is made on a GPU or for SDXL base")
            return
        self.status(
            f"Memory estimate: ~{est.peak / budget.GIB:.2f} GiB peak (weights {est.weights / budget.GIB:.2f}, LoRA/TI "
            f"with gradients {est.trainable / budget.GIB:.2f}, optimizer {est.optimizer_state / budget.GIB:.2f}, "
            f"activations {est.activations / budget.GIB:.2f})"
        )
        if cuda:
            free = torch.cuda.mem_get_info(self.device)[0] + self._bytes_on_device()
            msg = budget.preflight_message(est.peak, free, budget.fitting_alternatives(settings, self.comps.unet.config, text))
            if msg:
                raise DCOError(msg)

    def _bytes_on_device(self) -> int:
        """What the models already hold on the training device (counted again by the estimate)."""
        seen, total = set(), 0
        for m in (self.comps.unet, *self.comps.text_encoders):
            for p in m.parameters():
                if p.device == self.device and p.data_ptr() not in seen:
                    seen.add(p.data_ptr())
                    total += p.numel() * p.element_size()
        return total

    def status(self, text: str) -> None:
        self.monitor.status(text)

    def autocast(self):
        return self.acc.autocast()

    def _encode_data(self) -> TrainData:
        if self.comps.vae is None:
            raise DCOError("No VAE was given to encode the training images.")
        spec = load_dataset_spec(self.cfg)
        self.monitor.phase(PREPARING, 0, len(spec.samples))
        _move(self.comps.vae, self.device, torch.float32)
        return encode_dataset(vae_encoder(self.comps.vae), spec, self.cfg, progress=self.monitor.unit_done(PREPARING))

    def _place_models(self) -> None:
        dtype = weight_dtype(self.mp, self.device)
        for m in (self.comps.unet, *self.comps.text_encoders):
            m.requires_grad_(False)
            _move(m, self.device, dtype)
        self.comps.unet.train()
        for item in self.data.items:
            for it in (item, item.flipped):
                if it is not None:
                    it.mean = it.mean.to(self.device)
                    it.std = it.std.to(self.device) if it.std is not None else None

    def _park_text_encoders(self) -> None:
        for enc in self.comps.text_encoders:
            if next(enc.parameters()).device != self.text_home:
                enc.to(self.text_home)

    @contextlib.contextmanager
    def text_encoders_on_device(self) -> Iterator[None]:
        """The text encoders on the training device for the block (they may be parked in host memory)."""
        if self.text_home == self.device:
            yield
            return
        for enc in self.comps.text_encoders:
            enc.to(self.device)
        try:
            yield
        finally:
            self._park_text_encoders()

    def _encode_batch(self, prompts: list[str]) -> PromptEmbeds:
        with self.text_encoders_on_device():
            return encode_prompts(self.comps.tokenizers, self.comps.text_encoders, prompts)

    def _encode_each(self, prompts: list[str]) -> list[PromptEmbeds]:
        # one prompt at a time, so a cached embedding never depends on what it was batched with;
        # each is a unit of the caching phase (reported, and Cancel checked, after it)
        done = self.monitor.unit_done(CACHING)
        self.monitor.phase(CACHING, 0, len(prompts))
        out = []
        for i, p in enumerate(prompts):
            out.append(self._encode_batch([p])[0:1])
            done(i + 1, len(prompts))
        return out

    def _optimizer(self, groups: list[dict[str, Any]]):
        kw = dict(betas=(self.cfg.adam_beta1, self.cfg.adam_beta2), eps=self.cfg.adam_epsilon,
                  weight_decay=self.cfg.adam_weight_decay)
        if self.cfg.use_8bit_adam:
            if self.device.type != "cuda":
                raise DCOError("8-bit AdamW needs a CUDA GPU; turn use_8bit_adam off on the CPU.")
            try:
                import bitsandbytes as bnb
            except ImportError as exc:
                raise DCOError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes.") from exc
            return bnb.optim.AdamW8bit(groups, **kw)
        return torch.optim.AdamW(groups, **kw)

    # ------------------------------------------------------------------ one step
    def _micro_step(self, indices: list[int]) -> tuple[torch.Tensor, Any]:
        cfg, g = self.cfg, self.generator
        if self.data.encode_fn is not None:  # random crops: the only reason to re-encode
            items = [self.data.encode_fn(i, g) for i in indices]
            for it in items:
                it.mean, it.std = it.mean.to(self.device), it.std.to(self.device)
        else:
            items = [self.data.items[i] for i in indices]
        flips = [bool(torch.rand((), generator=g) < 0.5) if cfg.random_flip else False for _ in items]
        x0 = torch.stack([it.draw(g, f) for it, f in zip(items, flips)]).float()
        noise = torch.randn(x0.shape, generator=g)
        if cfg.offset_noise:
            noise = noise + cfg.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=g)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
        noise, t = noise.to(self.device), t.to(self.device)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        target = diffusion_target(noise, x0, t, self.noise_scheduler, self.prediction_type)
        time_ids = torch.stack([it.time_ids for it in items]).to(self.device)
        base = PromptEmbeds.cat([self.cache[it.base_prompt] for it in items])
        weights = None
        if cfg.snr_gamma:
            from diffusers.training_utils import compute_snr

            weights = min_snr_weight(compute_snr(self.noise_scheduler, t), cfg.snr_gamma, self.prediction_type)

        def cond() -> PromptEmbeds:
            if self.needs_text_grad:
                return self._encode_batch([it.prompt for it in items])
            return PromptEmbeds.cat([self.cache[it.prompt] for it in items])

        return dco_step(self.comps.unet, x_t, t, target, time_ids, base, cond, cfg.dco_beta, cfg.uses_reference,
                        weights, per_sample=cfg.dco_per_sample, autocast=self.autocast)

    def _optimizer_step(self) -> dict[str, float | None]:
        cfg = self.cfg
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for _ in range(cfg.gradient_accumulation_steps):
            batch = self.order.next_batch()
            mine = batch[self.rank * cfg.train_batch_size : (self.rank + 1) * cfg.train_batch_size]
            loss, stats = self._micro_step(mine)
            if not math.isfinite(stats.loss):
                raise DCOError(nan_loss_message(stats.loss, self.step + 1, self.checkpoints))
            self.acc.backward(loss / cfg.gradient_accumulation_steps)
            for k, v in stats.as_dict().items():
                if v is not None:
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        _sync_gradients(self.trainable, self.world)
        if cfg.max_grad_norm > 0:
            self.acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.token_set is not None:
            self.token_set.renormalize_()
        self.step += 1
        means = {k: sums[k] / counts[k] for k in sums}
        if self.world > 1:
            keys = sorted(means)
            vec = self.acc.reduce(torch.tensor([means[k] for k in keys], device=self.device), "mean")
            means = dict(zip(keys, vec.tolist()))
        return {k: means.get(k) for k in ("loss", "err_model", "err_ref", "reward_gap")}

    # ------------------------------------------------------------------ checkpoints (checkpointing.py)
    def _lora_states(self) -> dict[str, dict[str, torch.Tensor]]:
        return checkpointing.lora_states(self)

    def save_checkpoint(self) -> Path:
        self.monitor.phase(SAVING, 0, 1)
        path = checkpointing.save_checkpoint(self)
        self.saved_step = self.step
        self.monitor.phase(SAVING, 1, 1)
        return path

    def resume(self, folder: Path) -> None:
        checkpointing.resume(self, folder)

    # ------------------------------------------------------------------ previews, drift (monitor.py)
    def _monitor(self, info: StepInfo) -> None:
        cfg = self.cfg
        if self.drift is not None and (self.step % cfg.drift_every == 0 or self.step == cfg.max_train_steps):
            self.monitor.measure_drift(info, self.drift, self.comps.text_encoders if cfg.train_text_encoder_lora else ())
        if cfg.validation_every and cfg.validation_prompts and self.cb.on_preview and self.is_main and (
            self.step % cfg.validation_every == 0 or self.step == cfg.max_train_steps
        ):
            from .sample import render_previews

            def render(on_step: Callable[[int, int], None]) -> list[Any]:
                with self.text_encoders_on_device():
                    return render_previews(self.comps, cfg, self.token_set, self.autocast,
                                           decode=self.run.decode_latents, on_step=on_step)

            info.preview_s = self.monitor.preview(self.step, render)
            self.monitor.phase(TRAINING, self.step, cfg.max_train_steps)

    def _per_image(self, units: int) -> list[dict[str, Any]]:
        """The final per-image errors (main process); each image is a unit of the saving phase."""
        if not self.is_main or self.monitor.stop_seen_here():
            return []

        def token_prompt(p: str) -> PromptEmbeds:
            if self.needs_text_grad:  # the TI rows / text LoRA trained: the cache holds their start
                with self.autocast():
                    return self._encode_batch([p])
            return self.cache[p]

        def on_item(done: int, total: int) -> None:
            self.monitor.phase(SAVING, done, units)
            if self.monitor.stop_seen_here():
                raise Cancelled()

        self.monitor.phase(SAVING, 0, units)
        with self.text_encoders_on_device():
            return per_image_errors(self.comps.unet, self.data.items, token_prompt, self.cache.__getitem__,
                                    self.noise_scheduler, self.prediction_type, self.autocast, on_item)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        cfg, run = self.cfg, self.run
        if self.is_main:
            run.output_dir.mkdir(parents=True, exist_ok=True)
        folder = ckpt_io.resolve_resume(run.checkpoint_dir, run.resume)
        if folder is None and run.resume == "latest":
            log.warning("No checkpoint in %s to resume from: starting afresh.", run.checkpoint_dir)
            if self.cb.on_status:
                self.cb.on_status(f"No checkpoint in {run.checkpoint_dir} to resume from: starting afresh")
        if folder is not None:
            self.resume(folder)
        else:
            self.monitor.start_log()
        self.monitor.check()
        if self.acc.log_with:
            self.acc.init_trackers("dco", config={k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))})
        if self.drift is not None and self.step == 0:
            first = {"step": 0, **self.drift.measure(self.comps.text_encoders if cfg.train_text_encoder_lora else ())}
            self._log(first)
            self.monitor.metrics(first)
            self.monitor.check()
        progress = None
        if run.progress_bar and self.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.max_train_steps, initial=self.step, desc="DCO", dynamic_ncols=True)
        self.status("Training")
        self.monitor.phase(TRAINING, self.step, cfg.max_train_steps)
        start, start_step, stopped = time.perf_counter(), self.step, False
        held = contextlib.ExitStack()
        held.enter_context(_share_lora_inputs(self.comps.unet, self.mp in ("bf16", "fp16")))
        try:
            while self.step < cfg.max_train_steps:
                t0 = time.perf_counter()
                stats = self._optimizer_step()
                self.monitor.step_timed(time.perf_counter() - t0)
                elapsed = time.perf_counter() - start
                rate = elapsed / max(1, self.step - start_step)
                info = StepInfo(step=self.step, total=cfg.max_train_steps, lr=self.lr_scheduler.get_last_lr()[0],
                                elapsed_s=elapsed, eta_s=rate * (cfg.max_train_steps - self.step), **stats)
                self._monitor(info)
                self._log({k: v for k, v in info.as_dict().items() if v is not None and k not in ("total",)})
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{info.loss:.4f}", gap=f"{info.reward_gap or 0:.2e}")
                if self.cb.on_step:
                    self.cb.on_step(info)
                stop = self._stop_requested()
                if not stop and cfg.checkpointing_steps and self.step % cfg.checkpointing_steps == 0 \
                        and self.step < cfg.max_train_steps:
                    self.save_checkpoint()
                    stop = self._stop_requested()  # a Cancel during the save stops here, not a step later
                    if not stop:
                        self.monitor.phase(TRAINING, self.step, cfg.max_train_steps)
                if stop:
                    # Cancel is honoured even after the last step: no final files, and a checkpoint
                    # from which `resume` writes them at once
                    stopped = True
                    if self.saved_step != self.step:
                        self.status(f"Stopping at step {self.step}: saving a checkpoint")
                        self.save_checkpoint()
                    break
        finally:
            held.close()
            if progress is not None:
                progress.close()
        lora = emb = None
        per_image: list[dict[str, Any]] = []
        if not stopped:
            try:
                per_image, (lora, emb) = self.save_outputs()
            except Cancelled:  # nothing final was written; keep the trained state to resume from
                stopped = True
                if self.saved_step != self.step:
                    self.save_checkpoint()
        if self.acc.log_with:
            self.acc.end_training()
        return TrainResult(lora, emb, run.log_path, self.checkpoints, self.step, stopped, self.history, self.comps,
                           self.token_set, per_image=per_image, warnings=list(getattr(self.data, "warnings", [])))

    def _stop_requested(self) -> bool:
        return self.monitor.stop_requested()

    def _log(self, row: dict[str, Any]) -> None:
        self.monitor.log(row)

    def save_outputs(self) -> tuple[list[dict[str, Any]], tuple[Path | None, Path | None]]:
        """The final files: the LoRA, the embeddings and per_image.json (with the per-image errors it
        returns). All are staged and renamed in together after the last Cancel check: a Cancel
        during the save raises `Cancelled` on every process and leaves none of them."""
        cfg, run = self.cfg, self.run
        self.status("Saving")
        units = len(self.data.items) + 1  # the images' errors, then the files
        per_image: list[dict[str, Any]] = []
        try:
            per_image = self._per_image(units)
        except Cancelled:  # seen on this process alone: the collective check below stops every process
            pass
        meta = {
            "dco.config": cfg.to_json(),
            "dco.step": str(self.step),
            "dco.tokens": json.dumps(list(self.token_set.tokens) if self.token_set else []),
            "dco.initializers": json.dumps(list(self.token_set.initializers) if self.token_set else []),
            "ss_output_name": run.lora_path.stem,
            **run.metadata,
        }
        lora_path = emb_path = None
        staged = checkpointing.StagedFiles()
        try:
            if self.is_main and not self.monitor.stop_seen_here():
                staged_emb = None
                if self.token_set is not None:  # first: the LoRA records the embeddings file's name and hash
                    staged_emb = save_embeddings(staged.path(run.embeddings_path), self.token_set.to_embeddings(),
                                                 {"dco.step": str(self.step)})
                    emb_path = run.embeddings_path
                meta.update(subject_metadata(staged_emb, cfg.validation_cfg, cfg.validation_rg))
                if staged_emb is not None:
                    meta[META_EMBEDDINGS] = run.embeddings_path.name  # the staged file's bytes, the final name
                if not self.monitor.stop_seen_here():
                    alphas = {c: cfg.alpha for c in ("unet", "text_encoder", "text_encoder_2")}
                    save_lora(staged.path(run.lora_path), self._lora_states(), alphas, meta, dtype=run.save_precision)
                    lora_path = run.lora_path
                text = json.dumps(per_image, indent=1)
                atomic_write(staged.path(run.output_dir / PER_IMAGE_NAME), lambda tmp: tmp.write_text(text, encoding="utf-8"))
            self.acc.wait_for_everyone()
            if self._stop_requested():  # every process: the main one may have seen Cancel alone
                raise Cancelled()
            if self.is_main:
                staged.commit()
            self.monitor.phase(SAVING, units, units)
        finally:
            staged.discard()
        self.acc.wait_for_everyone()
        return per_image, (lora_path, emb_path)



def train(cfg: TrainConfig, components: SDXLComponents, run: RunOptions, data: TrainData | None = None) -> TrainResult:
    """Train a DCO LoRA (and TI tokens) and write its files. The components are modified in place
    (the LoRA is injected, tokens are added); pass fresh ones for every run.

    A Cancel (`Callbacks.should_stop`) during a step or a preview stops after that step with a
    checkpoint; one during the set-up or the final save stops at the next unit of work. Either way
    the result is `stopped` and no final file is written."""
    trainer = None
    try:
        trainer = _Trainer(cfg, components, run, data)
        return trainer.fit()
    except Cancelled:
        log.info("Cancelled: no final files written.")
        if trainer is not None and trainer.acc.log_with:
            trainer.acc.end_training()
        step = getattr(trainer, "step", 0) if trainer is not None else 0
        history = list(trainer.history) if trainer is not None and "monitor" in trainer.__dict__ else []
        checkpoints = list(getattr(trainer, "checkpoints", [])) if trainer is not None else []
        data = getattr(trainer, "data", data) if trainer is not None else data
        return TrainResult(None, None, run.log_path, checkpoints, step, True, history, components,
                           getattr(trainer, "token_set", None), warnings=list(getattr(data, "warnings", None) or []))
    finally:
        # Callbacks bound to the trainer (the drift meter's) refer back to it; emptying it breaks
        # that cycle, so the optimizer and the model copies are freed now, not at the next gc.
        if trainer is not None:
            trainer.__dict__.clear()
