"""peft LoRA on the UNet (and optionally the text encoders), with an off switch for ε_ref.

DCO's reference model is the same network with the LoRA switched off (peft's
`enable_adapters(False)` on every tuner layer), so no second copy of the UNet is kept.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .errors import DCOError

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER = "dco"


_LAYERS: "weakref.WeakKeyDictionary[nn.Module, list[Any]]" = weakref.WeakKeyDictionary()


def _tuner_layers(model: nn.Module) -> list[Any]:
    """The model's peft layers, found once per model (walking SDXL's modules costs milliseconds)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = _LAYERS.get(model)
    if layers is None:
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if layers:
            _LAYERS[model] = layers
    return layers


def refresh_layers(model: nn.Module) -> None:
    """Forget the cached layer list after adapters were injected or removed."""
    _LAYERS.pop(model, None)


def add_lora(
    model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], seed: int = 0, adapter: str = ADAPTER
) -> list[nn.Parameter]:
    """Inject a Gaussian-initialised LoRA (up-weights zero) and return its trainable parameters.

    The initialisation draws from a private generator state, so the global RNG is left alone
    and the same seed gives the same LoRA.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets), lora_dropout=0.0
    )
    devices = [torch.device("cuda", torch.cuda.current_device())] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=adapter)
    refresh_layers(model)
    params = []
    for name, p in model.named_parameters():
        if "lora_" in name and f".{adapter}." in name + ".":
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
        else:
            p.requires_grad_(False)
    if not params:
        raise ValueError(f"No module of {type(model).__name__} matched the LoRA targets {targets}.")
    return params


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA of `model` on or off.

    This sets the flag that peft's layers read in `forward` (`_disable_adapters`) directly. peft's
    public `enable_adapters` sets the same flag but also flips `requires_grad` on every adapter
    weight, which is pointless for the no-grad reference pass and costs about 6 ms per toggle on the
    tiny model (3 per step) and ~0.1 s on SDXL's 560 projections. Layers without the flag (another
    peft) fall back to `enable_adapters`; a test checks both give the same outputs.
    """
    for layer in _tuner_layers(model):
        if hasattr(layer, "_disable_adapters"):
            layer._disable_adapters = not enabled
        else:
            layer.enable_adapters(enabled)


@contextlib.contextmanager
def lora_disabled(*models: nn.Module | None) -> Iterator[None]:
    """Run the block with every LoRA of `models` switched off (the reference model)."""
    live = [m for m in models if m is not None]
    for m in live:
        set_lora_enabled(m, False)
    try:
        yield
    finally:
        for m in live:
            set_lora_enabled(m, True)


def lora_state_dict(model: nn.Module, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """peft-format (`...to_q.lora_A.weight`) state dict of one adapter."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}


def load_lora_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], adapter: str = ADAPTER) -> None:
    """Copy a `lora_state_dict` back into the injected adapter, in place (exact)."""
    own = {n: p for n, p in model.named_parameters() if f".{adapter}." in n}
    missing = []
    with torch.no_grad():
        for key, value in state.items():
            name = key.replace(".weight", f".{adapter}.weight")
            if name not in own:
                missing.append(key)
                continue
            if tuple(own[name].shape) != tuple(value.shape):
                raise DCOError(
                    f"The LoRA tensor {key} is {tuple(value.shape)} but the model's is {tuple(own[name].shape)}; "
                    "it was saved for another model or another rank. Resume with the same model and rank."
                )
            own[name].copy_(value.to(own[name]))
    if missing:
        raise ValueError(f"{len(missing)} LoRA tensors have no place in the model, e.g. {missing[0]}.")
