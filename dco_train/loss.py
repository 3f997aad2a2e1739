"""The DCO loss and its parts, as pure tensor functions (DESIGN 2.1).

    err_model = mean((ε_θ(x_t, t, c) - target)²)          with gradient
    err_ref   = mean((ε_ref(x_t, t, c_base) - target)²)    no gradient
    loss      = -log σ(-β (err_model - err_ref))

By default both errors are averaged over the whole batch before the sigmoid, as the reference
does; `per_sample=True` applies the sigmoid to each sample and averages the losses. β <= 0 gives
the plain diffusion loss (DreamBooth-LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossStats:
    loss: float
    err_model: float
    err_ref: float | None
    reward_gap: float | None  # err_ref - err_model: > 0 means the LoRA fits better than the base

    def as_dict(self) -> dict[str, float | None]:
        return {"loss": self.loss, "err_model": self.err_model, "err_ref": self.err_ref, "reward_gap": self.reward_gap}


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, in fp32: shape [B]."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def diffusion_target(noise: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor, scheduler, prediction_type: str) -> torch.Tensor:
    """ε for epsilon-prediction models, the velocity for v-prediction models."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"Unknown prediction type {prediction_type!r}; use epsilon or v_prediction.")


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ weights per sample: min(snr, γ)/snr for ε, min(snr, γ)/(snr + 1) for v."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def dco_loss(
    err_model: torch.Tensor,
    err_ref: torch.Tensor | None,
    beta: float,
    weights: torch.Tensor | None = None,
    per_sample: bool = False,
) -> tuple[torch.Tensor, LossStats]:
    """The DCO loss from per-sample errors [B]; `weights` (Min-SNR) scale both errors alike."""
    if weights is not None:
        err_model = err_model * weights
        err_ref = err_ref * weights if err_ref is not None else None
    if beta <= 0 or err_ref is None:
        loss = err_model.mean()
        m = float(err_model.detach().mean())
        r = None if err_ref is None else float(err_ref.detach().mean())
        stats = LossStats(float(loss.detach()), m, r, None if r is None else r - m)
        return loss, stats
    err_ref = err_ref.detach()
    if per_sample:
        loss = -F.logsigmoid(-beta * (err_model - err_ref)).mean()
    else:
        loss = -F.logsigmoid(-beta * (err_model.mean() - err_ref.mean()))
    m, r = float(err_model.detach().mean()), float(err_ref.mean())
    return loss, LossStats(float(loss.detach()), m, r, r - m)
