"""Reward guidance (DESIGN 2.4) as one tensor function, shared by the diffusers sampler and the
ComfyUI guider.

    out = ref(∅) + cfg · (ref(c_base) − ref(∅)) + rg · (ft(c) − ref(c_base))

The three weights (1 − cfg, cfg − rg, rg) sum to 1, so the same mix is exact whether the
predictions are ε, v or denoised x0 (ComfyUI's guiders work on x0).
"""

from __future__ import annotations

import math

import torch

from .errors import DCOError


def rg_mix(ref_uncond: torch.Tensor, ref_base: torch.Tensor, ft_token: torch.Tensor | None, cfg: float, rg: float) -> torch.Tensor:
    """Mix the three predictions. `ft_token` may be None only when `rg == 0`."""
    out = ref_uncond + cfg * (ref_base - ref_uncond)
    if rg == 0:
        return out
    if ft_token is None:
        raise ValueError("Reward guidance with rg != 0 needs the fine-tuned prediction on the token prompt.")
    return out + rg * (ft_token - ref_base)


def cfg_mix(uncond: torch.Tensor, cond: torch.Tensor, cfg: float) -> torch.Tensor:
    """Plain classifier-free guidance (what rg = 0 means, with the fine-tuned model)."""
    return uncond + cfg * (cond - uncond)


def check_window(rg_start: float | None, rg_end: float | None) -> None:
    """rg_start and rg_end (reward guidance over part of the schedule) are fractions from 0 to 1,
    the start not after the end; None (not known yet) passes."""
    for name, value in (("rg_start", rg_start), ("rg_end", rg_end)):
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise DCOError(f"{name} must be a fraction of the schedule from 0 to 1, not {value!r}; "
                           "rg_start 0 and rg_end 1 give reward guidance on every step.")
    if rg_start is not None and rg_end is not None and rg_start > rg_end:
        raise DCOError(f"rg_start ({rg_start:g}) is after rg_end ({rg_end:g}); reward guidance runs from rg_start to "
                       "rg_end, so make rg_start the smaller one (0 is the first step, 1 the last).")


def is_full_window(rg_start: float, rg_end: float) -> bool:
    return rg_start <= 0.0 and rg_end >= 1.0


def window_timesteps(rg_start: float, rg_end: float, num_train_timesteps: int = 1000) -> tuple[float, float]:
    """(high, low) timestep of the window, as ComfyUI's percent_to_sigma on a discrete schedule
    (fraction p is timestep (1 - p) * (T - 1)); the full schedule is unbounded."""
    last = num_train_timesteps - 1
    high = math.inf if rg_start <= 0.0 else (1.0 - rg_start) * last
    low = -math.inf if rg_end >= 1.0 else (1.0 - rg_end) * last
    return high, low
