"""`TrainConfig`: every training hyperparameter in one dataclass, with the DESIGN 2.5 recipes.

The command line builds its flags from these fields (their `help` metadata and the reference
script's flag names in `flags`), the ComfyUI trainer node takes its widget defaults from the
presets, checkpoints and safetensors metadata store `to_dict()`, and `__post_init__` rejects a
bad value with a sentence that names the field. Per-run settings that must not be saved
(output folder, callbacks, device) live in `train.RunOptions` instead.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import DCOError

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
PRESETS = ("subject", "style", "custom")
_TOKEN_RE = re.compile(r"^\S+$")


def _f(default: Any, help: str, *, flags: tuple[str, ...] = (), group: str = "training", **kw: Any) -> Any:
    """A dataclass field with its help text, extra command-line flag names and group."""
    meta = {"help": help, "flags": flags, "group": group}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    """Hyperparameters of one DCO run. Build one with `TrainConfig.subject()` or `.style()`."""

    preset: str = _f("custom", "Which recipe the defaults came from: subject, style or custom.")

    # ---- data
    data_dir: str | None = _f(None, "A folder of images with same-name .txt captions.", group="data")
    config_dir: str | None = _f(
        None, "A reference-format config.json (the reference script's --config_dir).", group="data"
    )
    config_name: str | None = _f(None, "Which entry of config.json to train on.", group="data")
    tokens: dict[str, str] = _f(
        {},
        'New tokens and the words they start from, written "<dog>=dog" (several: "<dog>=dog,<hat>=hat"). '
        "The word also replaces the token in the automatic base prompt.",
        group="data",
    )
    resolution: int = _f(1024, "Training resolution in pixels (a multiple of 8).", group="data")
    center_crop: bool = _f(True, "Crop the middle of each image; off means a random crop every step.", group="data")
    random_flip: bool = _f(False, "Flip images horizontally at random (both latents are cached).", group="data")
    buckets: bool = _f(False, "Aspect-ratio buckets instead of square crops.", group="data")

    # ---- textual inversion
    train_text_encoder_ti: bool = _f(
        False, "Learn the new tokens' embedding rows in both text encoders.", group="ti"
    )
    text_encoder_lr: float = _f(5e-6, "Learning rate of the token rows (and text-encoder LoRA).", group="ti")

    # ---- LoRA
    rank: int = _f(32, "LoRA rank of the UNet attention projections.", group="lora")
    lora_alpha: float | None = _f(None, "LoRA alpha; leave it out for alpha = rank (scale 1).", group="lora")
    train_text_encoder_lora: bool = _f(
        False, "Also put a LoRA on both text encoders' attention projections.", group="lora"
    )

    # ---- loss
    dco_beta: float = _f(
        1000.0,
        "DCO beta; 1000-2000 works well. A value <= 0 trains with the plain diffusion loss "
        "(DreamBooth-LoRA) and skips the reference pass.",
        flags=("--dcoloss_beta",),
        group="loss",
    )
    dco_per_sample: bool = _f(
        False,
        "Apply the DCO sigmoid per sample instead of to the batch-mean errors (the reference's way).",
        group="loss",
    )
    offset_noise: float = _f(0.0, "Offset-noise strength (the style recipe uses 0.1).", group="loss")
    snr_gamma: float | None = _f(None, "Min-SNR gamma (5 is usual); leave it out to turn the weighting off.", group="loss")
    prediction_type: str | None = _f(
        None, "epsilon or v_prediction; leave it out to use the model's own (its scheduler config).", group="loss"
    )

    # ---- optimiser
    learning_rate: float = _f(5e-5, "UNet LoRA learning rate.", group="optim")
    adam_weight_decay: float = _f(1e-4, "AdamW weight decay.", group="optim")
    adam_beta1: float = _f(0.9, "AdamW beta1.", group="optim")
    adam_beta2: float = _f(0.999, "AdamW beta2.", group="optim")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", group="optim")
    max_grad_norm: float = _f(1.0, "Gradient-norm clipping; 0 turns it off.", group="optim")
    use_8bit_adam: bool = _f(False, "8-bit AdamW from bitsandbytes (must be installed).", group="optim")
    lr_scheduler: str = _f("constant", "Learning-rate schedule: " + ", ".join(LR_SCHEDULERS) + ".", group="optim")
    lr_warmup_steps: int = _f(0, "Warm-up steps of the learning-rate schedule.", group="optim")
    lr_num_cycles: int = _f(1, "Restarts of cosine_with_restarts.", group="optim")
    lr_power: float = _f(1.0, "Power of the polynomial schedule.", group="optim")

    # ---- loop
    max_train_steps: int = _f(2000, "Optimizer steps to train.")
    train_batch_size: int = _f(1, "Images per step on each process.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    gradient_checkpointing: bool = _f(
        True, "Recompute activations in the backward pass instead of keeping them (UNet, and text encoders with "
        "TI): about 1/3 more compute, and it is what lets SDXL train in 12 GB (README, Memory and speed)."
    )
    mixed_precision: str = _f(
        "auto", "no, fp16, bf16, or auto (bf16 where the GPU has it, fp16 on other GPUs, no on the CPU)."
    )
    seed: int = _f(0, "Seed of data order, noise and timesteps.")
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint every N steps; 0 turns it off.")
    checkpoints_total_limit: int | None = _f(None, "Keep at most this many checkpoints; leave it out to keep all.")

    # ---- monitoring
    validation_prompts: list[str] = _f([], "Prompts rendered with reward guidance as training previews.", group="monitor")
    validation_every: int = _f(
        250, "Render the previews every N steps (when there are validation prompts); 0 turns them off. One preview "
        "of 20 sampling steps costs about 5 training steps (the monitor shows each one's cost), so at 250 the "
        "previews take about 2 percent of a run of either recipe.", group="monitor",
    )
    validation_steps: int = _f(20, "Sampling steps of each preview (each costs about 1/4 of a training step).",
                               group="monitor")
    validation_cfg: float = _f(7.5, "CFG scale of the previews.", group="monitor")
    validation_rg: float = _f(3.0, "Reward-guidance scale of the previews.", group="monitor")
    validation_seed: int = _f(42, "Seed of the previews (fixed, so they compare across steps).", group="monitor")
    drift_every: int = _f(
        200, "Measure prior drift and fit every N steps (about 4% of the training time); 0 turns the meter off.",
        group="monitor",
    )
    drift_prompts: list[str] = _f([], "Extra held-out prompts for the drift meter.", group="monitor")

    def __post_init__(self) -> None:
        self.tokens = dict(self.tokens or {})
        self.validation_prompts = list(self.validation_prompts or [])
        self.drift_prompts = list(self.drift_prompts or [])
        if self.preset not in PRESETS:
            raise DCOError(f"preset must be one of {', '.join(PRESETS)}, not {self.preset!r}.")
        positive_ints = ("resolution", "rank", "max_train_steps", "train_batch_size", "gradient_accumulation_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise DCOError(f"{name} must be a whole number of at least 1, not {value!r}.")
        if self.resolution % 8:
            raise DCOError(f"resolution must be a multiple of 8 (the VAE's scale), not {self.resolution}.")
        for name in ("learning_rate", "text_encoder_lr"):
            if not getattr(self, name) > 0:
                raise DCOError(f"{name} must be greater than 0, not {getattr(self, name)!r}.")
        for name in ("checkpointing_steps", "validation_every", "drift_every", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise DCOError(f"{name} must be 0 or more, not {getattr(self, name)!r}.")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise DCOError(f"lora_alpha must be greater than 0 (or empty for alpha = rank), not {self.lora_alpha!r}.")
        if self.offset_noise < 0:
            raise DCOError(f"offset_noise must be 0 or more, not {self.offset_noise!r}.")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise DCOError(f"snr_gamma must be greater than 0 (or empty to turn it off), not {self.snr_gamma!r}.")
        if self.max_grad_norm < 0:
            raise DCOError(f"max_grad_norm must be 0 (off) or more, not {self.max_grad_norm!r}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise DCOError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, not {self.mixed_precision!r}.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise DCOError(f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, not {self.lr_scheduler!r}.")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            raise DCOError(f"prediction_type must be epsilon or v_prediction, not {self.prediction_type!r}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise DCOError("checkpoints_total_limit must be at least 1, or empty to keep every checkpoint.")
        for token, word in self.tokens.items():
            if not isinstance(token, str) or not _TOKEN_RE.match(token):
                raise DCOError(f"The new token {token!r} must be one word without spaces, such as <dog>.")
            if not isinstance(word, str):
                raise DCOError(f"The initializer word of {token} must be text, not {word!r}.")
        if self.tokens and not self.train_text_encoder_ti:
            raise DCOError(
                f"tokens ({', '.join(self.tokens)}) are given but textual inversion is off"
                f"{' (the style preset trains no tokens)' if self.preset == 'style' else ''}, so they would be "
                "trained as plain characters; turn train_text_encoder_ti on (--train_text_encoder_ti) or "
                "remove the tokens."
            )
        if self.train_text_encoder_ti and not self.config_dir:  # config.json may give base prompts
            bare = [t for t, w in self.tokens.items() if not w.strip()]
            if bare:
                raise DCOError(
                    f"The token {bare[0]} has no word: the word starts its embedding and stands for it in the "
                    f"base prompt. Give one, e.g. tokens \"{bare[0]}=dog\" (--tokens \"{bare[0]}=dog\")."
                )
        if self.train_text_encoder_ti and not self.tokens and not self.config_dir:  # config.json may name them
            raise DCOError(
                "train_text_encoder_ti is on but no new tokens are given; set tokens such as '<dog>=dog' "
                "or turn textual inversion off (the style recipe trains no tokens)."
            )

    # ---- recipes -------------------------------------------------------------------------
    @classmethod
    def subject(cls, **overrides: Any) -> "TrainConfig":
        """DESIGN 2.5 subject recipe: TI tokens, rank 32, 2000 steps, lr 5e-5 / 5e-6, beta 1000."""
        base = dict(
            preset="subject", train_text_encoder_ti=True, rank=32, max_train_steps=2000,
            learning_rate=5e-5, text_encoder_lr=5e-6, dco_beta=1000.0, offset_noise=0.0, resolution=1024,
        )
        if "tokens" in overrides and not overrides["tokens"] and "train_text_encoder_ti" not in overrides:
            base["train_text_encoder_ti"] = False
        return cls(**{**base, **overrides})

    @classmethod
    def style(cls, **overrides: Any) -> "TrainConfig":
        """DESIGN 2.5 style recipe: no tokens, rank 64, 1000 steps, offset noise 0.1, beta 1000."""
        base = dict(
            preset="style", train_text_encoder_ti=False, rank=64, max_train_steps=1000,
            learning_rate=5e-5, dco_beta=1000.0, offset_noise=0.1, resolution=1024,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def preset_named(cls, name: str, **overrides: Any) -> "TrainConfig":
        if name == "subject":
            return cls.subject(**overrides)
        if name == "style":
            return cls.style(**overrides)
        if name == "custom":
            return cls(**overrides)
        raise DCOError(f"preset must be one of {', '.join(PRESETS)}, not {name!r}.")

    # ---- derived values ------------------------------------------------------------------
    @property
    def alpha(self) -> float:
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def uses_reference(self) -> bool:
        """Whether the loss needs the LoRA-off reference pass (DCO), or is plain MSE."""
        return self.dco_beta > 0

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DCOError(f"Unknown training settings: {', '.join(unknown)}.")
        return cls(**data)


def parse_tokens(spec: str | dict[str, str] | None) -> dict[str, str]:
    """Parse `"<dog>=dog, <hat>=hat"` into a dict. A bare `"<dog>"` gives an empty word (the token
    loader uses it to pick tokens from a file); training refuses an empty word (`__post_init__`)."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return dict(spec)
    if not isinstance(spec, str):
        raise DCOError(f"tokens must be text such as <dog>=dog, not {spec!r}.")
    out: dict[str, str] = {}
    for part in re.split(r"[,\n;]", spec):
        part = part.strip()
        if not part:
            continue
        token, _, word = part.partition("=")
        token, word = token.strip(), word.strip()
        if not token or not _TOKEN_RE.match(token):
            raise DCOError(f"Cannot read the token entry {part!r}; write it as <token>=word, e.g. <dog>=dog.")
        if token in out:
            raise DCOError(f"The token {token} is listed twice in tokens {spec!r}; give each token once.")
        if token == word:
            raise DCOError(
                f"The token {token} is the same as its word, so the token prompt and the base prompt would be "
                f"the same; choose a new string for the token, e.g. <{word}>={word}."
            )
        out[token] = word
    return out
