"""Reward-guidance sampling in ComfyUI: a GUIDER for SamplerCustomAdvanced and a KSampler-style node.

The guider subclasses `comfy.samplers.CFGGuider` like the stock `Guider_DualCFG` and overrides only
`set_conds`, `set_cfg` and `predict_noise`, plus a thin wrapper around `sample` for set-up and
tear-down (`outer_sample`/`inner_sample` changed signature between ComfyUI v0.3.64 and v0.8.0).
Per step it evaluates ε_ref(∅), ε_ref(c_base) and ε_θ(c) on the base model and mixes them with
`dco_train.rg.rg_mix` (DESIGN 2.4) in ComfyUI's denoised space, where the mix is exact because its
weights sum to one. When the model carries CFG patches (a `sampler_cfg_function` or post-CFG
functions, e.g. RescaleCFG) the CFG part goes through ComfyUI's `cfg_function` instead, exactly as
the stock DualCFGGuider does, and the RG term is added to its result. ε_θ is the base model plus `model_ft`'s extra LoRA patches applied by forward
hooks (`bypass.py`), switched on only for the token prompt's rows of one batched forward.

Reward guidance may cover only part of the schedule (`rg_start`..`rg_end`, fractions of it turned
into sigmas by the model's `percent_to_sigma`, as ComfyUI's ConditioningSetTimestepRange does).
Outside that window a step is plain CFG, on the base model with the base prompt or on the
fine-tuned model with the token prompt, and the third pass is not run.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers
from comfy_api.latest import io

from ..dco_train.errors import DCOError
from ..dco_train.rg import check_window as check_rg_window
from ..dco_train.rg import rg_mix
from .bypass import ALL_ROWS, BypassLoRA, RowLayoutError, extra_patches

log = logging.getLogger(__name__)

TOKEN_KEY = "dco_token"
TOKEN_INDEX = 2  # position of the token prompt in calc_cond_batch's list (as DualCFG's cond1)
WRAPPER_KEY = "dco_reward_guidance"
# What a step outside the rg_start..rg_end window runs (the node's outside_window choices, in order)
OUTSIDE_FT = "fine-tuned model, CFG on token prompt"
OUTSIDE_BASE = "base model, CFG on base prompt"
OUTSIDE_CHOICES = (OUTSIDE_FT, OUTSIDE_BASE)


class RewardGuidanceGuider(comfy.samplers.CFGGuider):
    """CFG on the base model plus `rg`·(fine-tuned token pass − base pass).

    `one_batch=True` runs the three prompts in one batch and switches the LoRA on for the token
    rows only; `False` runs the token prompt in a second forward pass (same numbers, slower on
    small batches). The one-batch mode falls back to two passes by itself if a layer's batch does
    not line up with the prompts.
    """

    def __init__(self, model: Any, model_ft: Any, one_batch: bool = True):
        super().__init__(model)
        self.extra = extra_patches(model, model_ft)
        BypassLoRA(model.model, self.extra)  # refuses unsupported patches now, at the guider node
        if not self.extra:
            log.warning("DCO: model_ft carries no LoRA on top of model; reward guidance then only changes the prompt.")
        self.cfg = 7.5
        self.rg = 3.0
        self.one_batch = one_batch
        self.rg_start, self.rg_end, self.outside = 0.0, 1.0, OUTSIDE_FT
        self._bypass: BypassLoRA | None = None
        self._run_one_batch = one_batch
        self._sigma_window = (math.inf, 0.0)  # (high, low): where reward guidance runs

    def set_conds(self, positive_token: list, positive_base: list, negative: list) -> None:
        self.inner_set_conds({"positive": positive_base, "negative": negative, TOKEN_KEY: positive_token})

    def set_cfg(self, cfg: float, rg: float = 3.0) -> None:
        self.cfg = float(cfg)
        self.rg = float(rg)

    def set_window(self, rg_start: float = 0.0, rg_end: float = 1.0, outside: str = OUTSIDE_FT) -> None:
        """Reward guidance from `rg_start` to `rg_end` (fractions of the schedule); `outside` says
        what the other steps run (one of OUTSIDE_CHOICES)."""
        check_window(rg_start, rg_end, outside)
        self.rg_start, self.rg_end, self.outside = float(rg_start), float(rg_end), outside

    # ------------------------------------------------------------------ sampling
    def sample(self, *args: Any, **kwargs: Any) -> Any:
        """Install the bypass hooks on the shared module, sample, and always take them off."""
        bypass = BypassLoRA(self.model_patcher.model, self.extra)
        outer_options = self.model_options
        self.model_options = comfy.model_patcher.create_model_options_clone(outer_options)
        comfy.patcher_extension.add_wrapper_with_key(
            comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, self._rows_wrapper(bypass),
            self.model_options, is_model_options=True,
        )
        self._bypass = bypass
        self._run_one_batch = self.one_batch
        self._sigma_window = sigma_window(self.model_patcher.get_model_object("model_sampling"), self.rg_start, self.rg_end)
        try:
            bypass.install()
            return super().sample(*args, **kwargs)
        finally:
            bypass.remove()
            self._bypass = None
            self.model_options = outer_options

    @staticmethod
    def _rows_wrapper(bypass: BypassLoRA):
        """APPLY_MODEL wrapper: turn the guider's request into the rows of this model call."""

        def wrapper(executor: Any, x: Any, t: Any, *args: Any, **kwargs: Any) -> Any:
            request = bypass.request
            if request is None:
                return executor(x, t, *args, **kwargs)
            if request is ALL_ROWS:
                bypass.rows = ALL_ROWS
                bypass.saw_rows = True
            else:
                options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
                bypass.select_rows(list(options.get("cond_or_uncond", [])), request, x.shape[0])
            try:
                return executor(x, t, *args, **kwargs)
            finally:
                bypass.rows = None

        return wrapper

    def predict_noise(self, x: Any, timestep: Any, model_options: dict = {}, seed: Any = None) -> Any:  # noqa: B006
        bypass = self._bypass
        if bypass is None:
            raise RuntimeError("RewardGuidanceGuider.predict_noise runs only inside sample().")
        negative = self.conds.get("negative")
        base = self.conds.get("positive")
        token = self.conds.get(TOKEN_KEY)
        model = self.inner_model

        high, low = self._sigma_window
        if not low <= float(timestep[0]) <= high:  # the test ComfyUI's timestep ranges make
            if self.outside == OUTSIDE_BASE:
                return comfy.samplers.sampling_function(model, x, timestep, negative, base, self.cfg,
                                                        model_options=model_options, seed=seed)
            return self._plain_cfg_ft(bypass, x, timestep, negative, token, model_options, seed)
        if self.rg == 0.0:  # plain CFG of the fine-tuned model on the token prompt, no third pass
            return self._plain_cfg_ft(bypass, x, timestep, negative, token, model_options, seed)

        uncond = negative
        if not model_options.get("disable_cfg1_optimization", False) and math.isclose(self.cfg, 1.0):
            uncond = None  # as DualCFG: cfg 1 needs no negative pass, and with rg 1 no base pass either
            if math.isclose(self.rg, 1.0):
                base = None

        out = None
        if self._run_one_batch:
            try:
                with _request(bypass, TOKEN_INDEX):
                    out = comfy.samplers.calc_cond_batch(model, [uncond, base, token], x, timestep, model_options)
            except RowLayoutError as exc:
                log.warning("DCO: one-batch reward guidance is not possible here (%s); using two passes.", exc)
                self._run_one_batch = False
        if out is None:
            out = comfy.samplers.calc_cond_batch(model, [uncond, base], x, timestep, model_options)
            with _request(bypass, ALL_ROWS):
                out = out + comfy.samplers.calc_cond_batch(model, [token], x, timestep, model_options)

        if "sampler_cfg_function" in model_options or model_options.get("sampler_post_cfg_function"):
            guided = comfy.samplers.cfg_function(model, out[1], out[0], self.cfg, x, timestep,
                                                 model_options=model_options, cond=base, uncond=uncond)
            return guided + (out[2] - out[1]) * self.rg
        return rg_mix(out[0], out[1], out[2], self.cfg, self.rg)

    def _plain_cfg_ft(self, bypass: BypassLoRA, x: Any, timestep: Any, negative: Any, token: Any,
                      model_options: dict, seed: Any) -> Any:
        """CFG of the fine-tuned model on the token prompt (what rg = 0 means): the LoRA on every row."""
        with _request(bypass, ALL_ROWS):
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, token, self.cfg,
                                                    model_options=model_options, seed=seed)


def sigma_window(sampling: Any, rg_start: float, rg_end: float) -> tuple[float, float]:
    """(high, low) sigma of the window: a step whose sigma lies in it gets reward guidance. The
    full schedule (0 to 1) is unbounded, so it holds every step whatever the model's sampling."""
    high = math.inf if rg_start <= 0.0 else float(sampling.percent_to_sigma(rg_start))
    low = -math.inf if rg_end >= 1.0 else float(sampling.percent_to_sigma(rg_end))
    return high, low


class _request:
    """Ask the APPLY_MODEL wrapper for LoRA rows during one block; always switched off after."""

    def __init__(self, bypass: BypassLoRA, what: Any):
        self.bypass, self.what = bypass, what

    def __enter__(self) -> None:
        self.bypass.request = self.what
        self.bypass.fired = 0
        self.bypass.saw_rows = False

    def __exit__(self, *exc: Any) -> None:
        self.bypass.request = None
        self.bypass.rows = None
        if exc[0] is None and not self.bypass.empty and self.bypass.fired == 0 and self.bypass.saw_rows:
            raise RuntimeError("DCO: the LoRA hooks never ran during the token pass; the model was not called through its layers.")


# ---------------------------------------------------------------------------------------------- nodes
_CFG_TIP = "Classifier-free guidance scale of the base model on the base prompt (7.5 in the DCO paper)."
_RG_TIP = ("Reward-guidance scale: how strongly the fine-tuned model on the token prompt pulls away from the base "
           "model on the base prompt (3.0 in the DCO paper). 0 means plain CFG with model_ft and the token prompt.")


def _common_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The base model, straight from Load Checkpoint (no DCO LoRA)."),
        io.Model.Input("model_ft", tooltip="The same model after the stock LoRA loader(s): the subject LoRA, or subject + style."),
        io.Conditioning.Input("positive_token", tooltip="The prompt with the learned tokens, e.g. 'a <dog> on a beach' (the token output of DCO Prompt Pair)."),
        io.Conditioning.Input("positive_base", tooltip="The same prompt with plain words, e.g. 'a dog on a beach' (the base output of DCO Prompt Pair)."),
        io.Conditioning.Input("negative", tooltip="The negative prompt."),
    ]


def _guidance_inputs() -> list:
    return [
        io.Float.Input("cfg", default=7.5, min=0.0, max=GUIDANCE_MAX, step=0.1, round=0.01, tooltip=_CFG_TIP),
        io.Float.Input("rg", default=3.0, min=0.0, max=GUIDANCE_MAX, step=0.1, round=0.01, tooltip=_RG_TIP),
    ]


_RG_START_TIP = ("Where reward guidance starts, as a fraction of the schedule (0 = the first, noisiest step), like "
                 "ConditioningSetTimestepRange. 0 and rg_end 1 = every step.")
_RG_END_TIP = ("Where reward guidance ends, as a fraction of the schedule (1 = the last step). Steps outside "
               "rg_start..rg_end skip the third model pass, so a window is also faster.")
_OUTSIDE_TIP = ("What the steps outside rg_start..rg_end run: plain CFG of the fine-tuned model (model_ft) on the "
                "token prompt, or of the base model on the base prompt.")


def _window_inputs() -> list:
    """Appended after every other input, so workflows saved before them keep their widget values."""
    return [
        io.Float.Input("rg_start", default=0.0, min=0.0, max=1.0, step=0.01, optional=True, tooltip=_RG_START_TIP),
        io.Float.Input("rg_end", default=1.0, min=0.0, max=1.0, step=0.01, optional=True, tooltip=_RG_END_TIP),
        io.Combo.Input("outside_window", options=["fine-tuned model, CFG on token prompt",
                                                  "base model, CFG on base prompt"],
                       default="fine-tuned model, CFG on token prompt", optional=True, tooltip=_OUTSIDE_TIP),
    ]


GUIDANCE_MAX = 100.0


def check_guidance(cfg: float | None, rg: float | None) -> None:
    """cfg and rg must be finite and within the widgets' range. Validation that takes them skips
    ComfyUI's own min/max checks, and those let NaN through (every comparison with NaN is false)."""
    for name, value in (("cfg", cfg), ("rg", rg)):
        if value is None:  # linked: known only when the node runs
            continue
        if not math.isfinite(value) or not 0.0 <= value <= GUIDANCE_MAX:
            raise DCOError(f"{name} must be a number from 0 to {GUIDANCE_MAX:g}, not {value!r}; "
                           f"{'7.5' if name == 'cfg' else '3.0'} is the DCO paper's value.")


def check_window(rg_start: float | None, rg_end: float | None, outside: str | None = OUTSIDE_FT) -> None:
    """rg_start and rg_end are fractions of the schedule, the start not after the end."""
    check_rg_window(rg_start, rg_end)
    if outside is not None and outside not in OUTSIDE_CHOICES:
        raise DCOError(f"outside_window must be one of {', '.join(repr(c) for c in OUTSIDE_CHOICES)}, not {outside!r}.")


def validate_guidance(cfg: float | None, rg: float | None, rg_start: float | None = None,
                      rg_end: float | None = None) -> bool | str:
    try:
        check_guidance(cfg, rg)
        check_window(rg_start, rg_end, None)
    except DCOError as exc:
        return str(exc)
    return True


def make_guider(model: Any, model_ft: Any, positive_token: list, positive_base: list, negative: list,
                cfg: float, rg: float, rg_start: float = 0.0, rg_end: float = 1.0,
                outside_window: str = OUTSIDE_FT) -> RewardGuidanceGuider:
    check_guidance(cfg, rg)
    check_window(rg_start, rg_end, outside_window)
    guider = RewardGuidanceGuider(model, model_ft)
    if not guider.extra and rg != 0:
        # a node error, where the user looks: ComfyUI's V3 API has no warning the page shows
        raise DCOError(
            "model_ft carries no LoRA on top of model, so reward guidance would only change the prompt. Connect "
            "model_ft through LoraLoader (the DCO LoRA, strength above 0) after the same checkpoint that feeds "
            "model, or set rg to 0 for plain CFG."
        )
    guider.set_conds(positive_token, positive_base, negative)
    guider.set_cfg(cfg, rg)
    guider.set_window(rg_start, rg_end, outside_window)
    return guider


class DCORewardGuidanceGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCORewardGuidanceGuider",
            display_name="DCO Reward Guidance Guider",
            category="DCO/sampling",
            description=("Reward guidance (DCO): CFG of the base model on the base prompt plus rg times the difference "
                         "between the fine-tuned model on the token prompt and the base model on the base prompt. "
                         "Plug the GUIDER into SamplerCustomAdvanced; every sampler and scheduler works."),
            inputs=_common_inputs() + _guidance_inputs() + _window_inputs(),
            outputs=[io.Guider.Output("guider", display_name="GUIDER", tooltip="A guider for SamplerCustomAdvanced.")],
        )

    @classmethod
    def validate_inputs(cls, cfg: float | None = None, rg: float | None = None, rg_start: float | None = None,
                        rg_end: float | None = None) -> bool | str:
        return validate_guidance(cfg, rg, rg_start, rg_end)

    @classmethod
    def execute(cls, model: Any, model_ft: Any, positive_token: list, positive_base: list, negative: list,
                cfg: float, rg: float, rg_start: float = 0.0, rg_end: float = 1.0,
                outside_window: str = OUTSIDE_FT) -> io.NodeOutput:
        return io.NodeOutput(make_guider(model, model_ft, positive_token, positive_base, negative, cfg, rg,
                                         rg_start, rg_end, outside_window))


class DCORewardGuidanceSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DCORewardGuidanceSampler",
            display_name="DCO Reward Guidance Sampler",
            category="DCO/sampling",
            description="KSampler with DCO reward guidance: the Reward Guidance Guider and a sampler in one node.",
            inputs=_common_inputs() + [
                io.Latent.Input("latent_image", tooltip="The latent to denoise (Empty Latent Image for text-to-image)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed of the starting noise."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Number of sampling steps."),
                *_guidance_inputs(),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                               tooltip="The sampling algorithm."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="How the noise levels are spaced over the steps."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the latent is replaced by noise; below 1 for image-to-image."),
                *_window_inputs(),
            ],
            outputs=[io.Latent.Output("latent", display_name="LATENT", tooltip="The denoised latent.")],
        )

    @classmethod
    def validate_inputs(cls, cfg: float | None = None, rg: float | None = None, rg_start: float | None = None,
                        rg_end: float | None = None) -> bool | str:
        return validate_guidance(cfg, rg, rg_start, rg_end)

    @classmethod
    def execute(cls, model: Any, model_ft: Any, positive_token: list, positive_base: list, negative: list,
                latent_image: dict, seed: int, steps: int, cfg: float, rg: float, sampler_name: str,
                scheduler: str, denoise: float, rg_start: float = 0.0, rg_end: float = 1.0,
                outside_window: str = OUTSIDE_FT) -> io.NodeOutput:
        import comfy.model_management
        import comfy.sample
        import comfy.utils
        import latent_preview

        guider = make_guider(model, model_ft, positive_token, positive_base, negative, cfg, rg,
                             rg_start, rg_end, outside_window)
        samples = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        result = guider.sample(noise, samples, comfy.samplers.sampler_object(sampler_name), sigmas,
                               denoise_mask=latent_image.get("noise_mask"), callback=callback,
                               disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = latent_image.copy()
        out["samples"] = result.to(comfy.model_management.intermediate_device())
        return io.NodeOutput(out)
