"""Reward guidance (DESIGN 2.4) as one tensor function, shared by the diffusers sampler and the
ComfyUI guider.

    out = ref(∅) + cfg · (ref(c_base) − ref(∅)) + rg · (ft(c) − ref(c_base))

The three weights (1 − cfg, cfg − rg, rg) sum to 1, so the same mix is exact whether the
predictions are ε, v or denoised x0 (ComfyUI's guiders work on x0).
"""

from __future__ import annotations

import torch


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
