"""The prior-drift meter: how far fine-tuning moved the model on prompts it should not touch.

At fixed noises and timesteps (drawn once from a private generator, so the training RNG is never
consumed) it compares the fine-tuned UNet's ε with the LoRA-off UNet's ε on held-out prompts
without the new tokens:

    drift = mean((ε_θ(x_t, t, c_heldout) - ε_ref(x_t, t, c_heldout))²)
    fit   = mean((ε_θ(x_t, t, c_train) - target)²)   on the training captions

ε_ref never changes (the base model is frozen), so it is computed once. Each measurement is two
batched forward passes without gradients. The noised inputs x_t start from the training latents,
so they have real image statistics.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

from .lora import lora_disabled
from .loss import diffusion_target
from .text import PromptEmbeds

DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a chair",
    "a landscape painting of mountains and a lake",
    "a red car parked on a city street",
    "a bowl of fruit on a wooden table",
)
TIMESTEPS = (200, 500, 800)  # each measured sample is used at all of these


class DriftMeter:
    def __init__(
        self,
        unet: Any,
        encode: Callable[[Sequence[str]], PromptEmbeds],
        items: Sequence[Any],
        scheduler: Any,
        prediction_type: str,
        extra_prompts: Sequence[str] = (),
        autocast: Callable[[], Any] = contextlib.nullcontext,
        max_fit_items: int = 4,
        seed: int = 1234,
    ):
        """`items` are the training `LatentItem`s; `encode` turns prompts into SDXL conditioning."""
        self.unet, self.encode, self.autocast = unet, encode, autocast
        self.scheduler, self.prediction_type = scheduler, prediction_type
        self.device = next(unet.parameters()).device
        g = torch.Generator().manual_seed(seed)
        self.prompts = list(DEFAULT_PROMPTS) + list(extra_prompts)
        shape = tuple(items[0].mean.shape)
        same = [it for it in items if tuple(it.mean.shape) == shape]  # one batch needs one latent shape
        # every held-out prompt and every fit item at each of the fixed timesteps: one low-variance batch each
        held = [same[i % len(same)] for i in range(len(self.prompts))]
        fit = same[:max_fit_items]
        k = len(TIMESTEPS)
        self.prompts = [p for p in self.prompts for _ in range(k)]
        self.train_prompts = [it.prompt for it in fit for _ in range(k)]
        held, fit = [it for it in held for _ in range(k)], [it for it in fit for _ in range(k)]
        self.held = self._inputs(torch.stack([it.mean.float().cpu() for it in held]), [it.time_ids for it in held], g)
        self.fit_inputs = self._inputs(torch.stack([it.mean.float().cpu() for it in fit]), [it.time_ids for it in fit], g)
        self.eps_ref: torch.Tensor | None = None

    def _inputs(self, x0: torch.Tensor, time_ids: list[torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
        noise = torch.randn(x0.shape, generator=g)
        t = torch.tensor([TIMESTEPS[i % len(TIMESTEPS)] for i in range(x0.shape[0])], dtype=torch.long)
        return {
            "x_t": self.scheduler.add_noise(x0, noise, t).to(self.device),
            "t": t.to(self.device),
            "target": diffusion_target(noise, x0, t, self.scheduler, self.prediction_type).to(self.device),
            "time_ids": torch.stack([ti.float() for ti in time_ids]).to(self.device),
        }

    def _eps(self, inputs: dict[str, torch.Tensor], cond: PromptEmbeds, chunk: int = 4) -> torch.Tensor:
        outs = []
        for i in range(0, inputs["x_t"].shape[0], chunk):  # small batches: SDXL at 1024 px is memory-hungry
            s = slice(i, i + chunk)
            with self.autocast():
                out = self.unet(
                    inputs["x_t"][s], inputs["t"][s], encoder_hidden_states=cond.embeds[s],
                    added_cond_kwargs={"text_embeds": cond.pooled[s], "time_ids": inputs["time_ids"][s]},
                ).sample
            outs.append(out.float())
        return torch.cat(outs)

    @torch.no_grad()
    def measure(self, text_models: Sequence[Any] = ()) -> dict[str, float]:
        """drift and fit of the model as it is now (no gradients, no RNG consumed)."""
        was_training = self.unet.training
        self.unet.eval()
        try:
            if self.eps_ref is None:
                with lora_disabled(self.unet, *text_models):
                    with self.autocast():
                        held_ref = self.encode(self.prompts)
                    self.eps_ref = self._eps(self.held, held_ref.to(self.device))
            with self.autocast():
                held = self.encode(self.prompts)
            drift = float((self._eps(self.held, held.to(self.device)) - self.eps_ref).square().mean())
            result = {"drift": drift}
            with self.autocast():
                cond = self.encode(self.train_prompts)
            err = (self._eps(self.fit_inputs, cond.to(self.device)) - self.fit_inputs["target"]).square().mean()
            result["fit"] = float(err)
            return result
        finally:
            self.unet.train(was_training)
