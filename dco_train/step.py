"""One DCO micro-step on given tensors (DESIGN 2), shared by the trainer and the budget bench.

The trainer draws the noise, timesteps and prompts; this function runs the two UNet passes and the
loss. `bench/sdxl_budget.py` runs the very same function on fake tensors at true SDXL shapes, so the
memory and FLOP budget follows the code when the code changes.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from .lora import lora_disabled
from .loss import LossStats, dco_loss, per_sample_error
from .text import PromptEmbeds


def unet_eps(unet: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, emb: PromptEmbeds, time_ids: torch.Tensor) -> torch.Tensor:
    """The UNet's prediction for one batch of SDXL conditioning."""
    return unet(x_t, t, encoder_hidden_states=emb.embeds,
                added_cond_kwargs={"text_embeds": emb.pooled, "time_ids": time_ids}).sample


def dco_errors(
    unet: torch.nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor,
    time_ids: torch.Tensor,
    base: PromptEmbeds,
    cond: Callable[[], PromptEmbeds],
    uses_reference: bool,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample errors [B] of the LoRA pass (with gradient) and of the reference pass (or None).

    The reference pass (LoRA off, base-prompt embeddings `base`) runs under `no_grad`, so none of its
    activations outlive it: only its per-sample error is kept for the LoRA pass. `cond` makes the
    token prompt's embeddings (through the text encoders when TI rows train, else from the cache);
    it is called after the reference pass so the text encoders' activations do not overlap it.
    """
    err_ref = None
    if uses_reference:
        with torch.no_grad(), lora_disabled(unet), autocast():
            err_ref = per_sample_error(unet_eps(unet, x_t, t, base, time_ids), target)
    with autocast():
        pred = unet_eps(unet, x_t, t, cond(), time_ids)
    return per_sample_error(pred, target), err_ref


def dco_step(
    unet: torch.nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor,
    time_ids: torch.Tensor,
    base: PromptEmbeds,
    cond: Callable[[], PromptEmbeds],
    beta: float,
    uses_reference: bool,
    weights: torch.Tensor | None = None,
    per_sample: bool = False,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, LossStats]:
    """The DCO loss of one micro-batch, ready for `backward()` (see `dco_errors`)."""
    err_model, err_ref = dco_errors(unet, x_t, t, target, time_ids, base, cond, uses_reference, autocast)
    return dco_loss(err_model, err_ref, beta, weights, per_sample=per_sample)
