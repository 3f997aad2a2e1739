"""Memory and compute budget of one DCO training step, measured on fake tensors (issue 11).

`measure_step` builds the real network (SDXL base by default) under `FakeTensorMode`, so no weight
is allocated, injects the engine's LoRA (`lora.add_lora`) and runs the engine's own step
(`step.dco_errors`, the function the trainer calls) forward and backward, while

- `LiveMemory` (a `TorchDispatchMode`) adds up the live storages of every tensor an op returns and
  frees each through a weak-reference finalizer (torch's `MemTracker` registers a gradient hook on
  every parameter and fails on frozen weights), and
- `FlopCounterMode` counts the FLOPs.

Attention: on the CPU, fake mode would take SDPA's math path, which materialises the attention
matrix; the GPU's flash / memory-efficient kernels keep only the output and the log-sum-exp. The
memory run therefore routes `F.scaled_dot_product_attention` to the flash-style kernel
(`_scaled_dot_product_flash_attention_for_cpu`, which saves the same two tensors as the GPU's
flash kernel), and its FLOPs are counted with torch's SDPA formula.

Optimizer state is analytic (AdamW: two fp32 moments per trainable value; 8-bit AdamW: two bytes
plus a small block-wise fp32 scale). `estimate()` answers the trainer's pre-flight from a table of
fake-mode measurements (cached per settings) and analytic scalings that are exact: batch scales the
activations linearly, dtypes scale bytes by element size.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 2**30

SDXL_UNET: dict[str, Any] = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
MID_UNET: dict[str, Any] = dict(  # SDXL's block layout at 128 base channels, real conditioning widths (~130 M)
    SDXL_UNET, block_out_channels=(128, 256, 512), transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
)
CLIP_L: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
CLIP_G: dict[str, Any] = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                              hidden_act="gelu", projection_dim=1280, vocab_size=49408, max_position_embeddings=77)
SDXL_VAE: dict[str, Any] = dict(  # stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
    in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, scaling_factor=0.13025,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2,
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class LiveMemory(TorchDispatchMode):
    """Adds up the bytes of the live storages of every tensor an op returns (fake or real); `peak`
    is the high-water mark. A storage is freed when the last tensor that views it dies."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.now -= self.live.pop(key)
            del self.refs[key]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata  # the StorageImpl's address: one key per storage, shared by its views
        if key not in self.live:
            self.live[key] = storage.nbytes()
            self.refs[key] = 0
            self.now += self.live[key]
            self.peak = max(self.peak, self.now)
        self.refs[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


@contextlib.contextmanager
def flash_attention() -> Iterator[None]:
    """Route SDPA to the flash-style kernel, which saves output + log-sum-exp, never the attention matrix.

    It replaces `torch.nn.functional.scaled_dot_product_attention` for the block (diffusers looks it
    up at call time); a `TorchFunctionMode` would not reach the recomputation of gradient
    checkpointing, which runs inside the autograd engine.
    """
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or kw:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _flash_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _flash_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> Any:
    """torch's FLOP counter, taught the CPU flash kernel's forward and backward (same formula as SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _flash_cpu_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_cpu_backward_flops,
    })


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in `dtype` (`.to(dtype)` cannot swap fake parameters)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@dataclass(frozen=True)
class Settings:
    """What the budget of one step depends on."""

    resolution: int = 1024
    rank: int = 32
    ti: bool = False
    checkpointing: bool = True
    dtype: str = "bf16"  # frozen weights and activations
    optimizer: str = "adamw"  # or "adamw8bit"
    batch: int = 1
    reference: bool = True  # False: the plain-LoRA step (beta <= 0)


@dataclass(frozen=True)
class Budget:
    """Bytes of one step's parts, and its FLOPs (forward + backward)."""

    weights: int  # frozen UNet (+ text encoders with TI) in the weight dtype
    trainable: int  # LoRA + TI rows (fp32), their gradients
    optimizer_state: int
    activations: int  # the step's peak of everything else (activations, temporaries)
    flops: float
    trainable_params: int

    @property
    def peak(self) -> int:
        return self.weights + self.trainable + self.optimizer_state + self.activations


def optimizer_state_bytes(params: int, optimizer: str) -> int:
    """AdamW: two fp32 moments per value. bitsandbytes' AdamW8bit: two uint8 moments plus one fp32
    absmax per 256-value block each (tensors under 4096 values stay 32-bit; LoRA's are larger)."""
    if optimizer == "adamw8bit":
        return 2 * params + 2 * 4 * ((params + 255) // 256)
    return 8 * params


def _clip(cfg: dict[str, Any], projection: bool) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    conf = CLIPTextConfig(**cfg, eos_token_id=49407)
    return CLIPTextModelWithProjection(conf) if projection else CLIPTextModel(conf)


def _bytes(module: torch.nn.Module, frozen: bool) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad != frozen) + (
        sum(b.numel() * b.element_size() for b in module.buffers()) if frozen else 0)


def parameter_counts(unet_config: dict[str, Any] = SDXL_UNET) -> dict[str, int]:
    """Parameter counts of the UNet, both CLIPs and the VAE at their configs (built on fake tensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch._subclasses import FakeTensorMode

    with FakeTensorMode(), default_dtype(torch.bfloat16):
        models = {"unet": UNet2DConditionModel(**unet_config), "clip_l": _clip(CLIP_L, False),
                  "clip_g": _clip(CLIP_G, True), "vae": AutoencoderKL(**SDXL_VAE)}
        return {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}


class _TextCond:
    """The token prompt's embeddings through both encoders, with a gradient path into fp32 rows.

    The engine's TI hooks (`ti.TokenRows`) branch on the token ids' values, which fake tensors do not
    have; this splices one fp32 row into every position of the token embeddings' output instead, so
    the backward runs through every encoder layer exactly as with TI. `text.encode_prompts`'
    tokenizer and end-of-text lookup are data-dependent too: the pooled output is CLIPTextModel's own.
    """

    def __init__(self, encoders: list[torch.nn.Module], batch: int):
        self.encoders, self.batch = encoders, batch
        self.rows = [torch.nn.Parameter(torch.zeros(1, 1, e.config.hidden_size, dtype=torch.float32)) for e in encoders]
        for enc, row in zip(encoders, self.rows):
            enc.get_input_embeddings().register_forward_hook(functools.partial(self._splice, row))

    @staticmethod
    def _splice(row: torch.nn.Parameter, module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        return out + row.to(out.dtype)

    def __call__(self):
        from .text import PromptEmbeds

        ids = torch.zeros(self.batch, 77, dtype=torch.long)
        hidden, pooled = [], None
        for enc in self.encoders:
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", pooled)
        return PromptEmbeds(torch.cat(hidden, dim=-1), pooled)


def measure_step(settings: Settings, unet_config: dict[str, Any] = SDXL_UNET, memory: bool = True,
                 flops: bool = True) -> Budget:
    """Run the engine's step forward + backward at `settings` on fake tensors; see the module doc."""
    from diffusers import UNet2DConditionModel
    from torch._subclasses import FakeTensorMode

    from .lora import UNET_TARGETS, add_lora
    from .step import dco_errors
    from .text import PromptEmbeds

    dtype = DTYPES[settings.dtype]
    b, lat = settings.batch, settings.resolution // 8
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("meta"):
        with default_dtype(dtype):
            unet = UNet2DConditionModel(**unet_config)
            encoders = [_clip(CLIP_L, False), _clip(CLIP_G, True)] if settings.ti else []
            for m in (unet, *encoders):
                m.requires_grad_(False)
            # on the meta device peft skips moving the new LoRA layers (fake parameters cannot be swapped)
            params = add_lora(unet, settings.rank, settings.rank, UNET_TARGETS)
        if settings.checkpointing:
            unet.enable_gradient_checkpointing()
            for enc in encoders:
                enc.gradient_checkpointing_enable()
        unet.train()
        cond_fn = _TextCond(encoders, b) if settings.ti else None
        trainable = params + (cond_fn.rows if cond_fn else [])
        n_train = sum(p.numel() for p in trainable)
        weights = _bytes(unet, frozen=True) + sum(_bytes(e, frozen=True) for e in encoders)
        ctx = unet_config["cross_attention_dim"]
        x_t = torch.randn(b, 4, lat, lat, dtype=dtype)
        target = torch.randn(b, 4, lat, lat, dtype=dtype)
        t = torch.randint(0, 1000, (b,))
        time_ids = torch.randn(b, 6, dtype=dtype)
        base = PromptEmbeds(torch.randn(b, 77, ctx, dtype=dtype), torch.randn(b, 1280, dtype=dtype))
        if cond_fn is None:
            cached = PromptEmbeds(torch.randn(b, 77, ctx, dtype=dtype), torch.randn(b, 1280, dtype=dtype))
            cond_fn = lambda: cached  # noqa: E731
        # autocast is off: the frozen weights are already in `dtype`, so it would cast nothing but the
        # fp32 LoRA path, which the fp32 LoRA weights keep in fp32 under torch's promotion rules too
        mem, count = LiveMemory(), flop_counter()
        with flash_attention(), (count if flops else contextlib.nullcontext()), (mem if memory else contextlib.nullcontext()):
            err_model, _ = dco_errors(unet, x_t, t, target, time_ids, base, cond_fn, settings.reference)
            err_model.mean().backward()  # the loss's scalar ops (logsigmoid of two means) cost nothing
    grads = 4 * n_train  # made in the backward, live through the peak: counted with the trainable values
    return Budget(weights=weights, trainable=4 * n_train + grads,
                  optimizer_state=optimizer_state_bytes(n_train, settings.optimizer),
                  activations=max(0, mem.peak - grads), flops=float(count.get_total_flops()) if flops else 0.0,
                  trainable_params=n_train)


def derive(measured: Budget, measured_settings: Settings, want: Settings) -> Budget:
    """Scale a measurement to another dtype / optimizer / batch, where the scaling is exact:
    bytes by element size, activations linearly in the batch, FLOPs linearly in the batch."""
    size = {"bf16": 2, "fp16": 2, "fp32": 4}
    dt = size[want.dtype] / size[measured_settings.dtype]
    bt = want.batch / measured_settings.batch
    params = measured.trainable_params
    return Budget(weights=int(measured.weights * dt), trainable=measured.trainable,
                  optimizer_state=optimizer_state_bytes(params, want.optimizer),
                  activations=int(measured.activations * dt * bt), flops=measured.flops * bt, trainable_params=params)
