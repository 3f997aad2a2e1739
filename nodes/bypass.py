"""Forward-time ("bypass") LoRA: `model_ft`'s extra patches applied as output deltas on `model`.

Why not just sample `model_ft`: two ModelPatcher clones share one torch module, so evaluating both
in one step either silently uses the same weights twice or re-patches the whole UNet on every
switch (research/comfyui-api.md B.4). Instead the patches that `model_ft` carries on top of `model`
become forward hooks on the shared module that add `s·(α/r)·up(down(x))` to a layer's output, only
while switched on and, in the one-batch mode, only on the rows of the token prompt. No weight is
ever written, so the model is bit-identical afterwards whatever happens; `remove()` (called from
the guider's `finally`) takes every hook off again.

Modules are chosen by state-dict key, never by `isinstance(m, nn.Linear)`: ComfyUI's
mixed-precision Linear is not an `nn.Linear`. Patch types other than plain LoRA (LoHa, LoKr, DoRA,
diff, ...) fall back to a weight delta computed once from ComfyUI's own `calculate_weight`; keys
that are not the weight or bias of a Linear/Conv layer are refused with a clear message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

from ..dco_train.errors import DCOError

log = logging.getLogger(__name__)

ALL_ROWS = slice(None)
Rows = Union[slice, torch.Tensor, None]  # None = off; ALL_ROWS = every row; else the token rows
_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


class RowLayoutError(RuntimeError):
    """A hooked layer saw a batch that does not line up with the model input's rows; the guider
    then falls back to running the token prompt in its own forward pass."""


def extra_patches(model: Any, model_ft: Any) -> dict[str, list]:
    """The weight patches `model_ft` has on top of `model`: `{key: [patch tuple, ...]}`.

    Refuses a `model_ft` that is not a clone of `model` (another checkpoint) or that lacks some of
    `model`'s own patches (it does not continue from `model`).
    """
    if model_ft is model:
        return {}
    if not model_ft.is_clone(model):
        raise DCOError(
            "model_ft is not a clone of model: it holds a different network (another checkpoint or "
            "a second load of it). Connect model_ft from the same Load Checkpoint output as model, "
            "through the LoRA loader(s)."
        )
    for key, base in model.patches.items():
        ft = model_ft.patches.get(key, [])
        if len(ft) < len(base) or any(not _same_patch(a, b) for a, b in zip(base, ft)):
            raise DCOError(
                f"model carries a patch on {key} that model_ft lacks, so model_ft does not continue "
                "from model. Take model_ft from model's output through the LoRA loader(s), not the "
                "other way round."
            )
    base_wrappers = getattr(model, "weight_wrapper_patches", {})
    for key, fns in getattr(model_ft, "weight_wrapper_patches", {}).items():
        if len(fns) > len(base_wrappers.get(key, [])):
            raise DCOError(
                f"model_ft carries a weight wrapper on {key} (a trained in-memory adapter) that the "
                "reward-guidance guider cannot apply; save the LoRA and load it with a LoraLoader instead."
            )
    if set(model_ft.object_patches) != set(model.object_patches):
        log.warning("DCO: model_ft has object patches that model lacks; they are ignored on the token pass.")
    out = {}
    for key, ft in model_ft.patches.items():
        extra = ft[len(model.patches.get(key, [])):]
        if extra:
            out[key] = list(extra)
    return out


def _same_patch(a: Any, b: Any) -> bool:
    return a is b or (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b)
                      and all(x is y for x, y in zip(a, b)))


def _plain_lora(patch: tuple) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
    """(down, up, scale) when `patch` is a LoRA the bypass can apply exactly, else None."""
    strength, adapter, strength_model, offset, function = patch
    if offset is not None or function is not None or strength_model != 1.0:
        return None
    if type(adapter).__name__ != "LoRAAdapter" or not hasattr(adapter, "weights"):
        return None
    up, down, alpha, mid, dora_scale, reshape = adapter.weights[:6]
    if mid is not None or dora_scale is not None or reshape is not None:
        return None
    scale = float(strength) * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
    return down, up, scale


@dataclass
class _ModuleDelta:
    """Everything added to one layer's output: LoRA pairs (folded into one) and weight deltas."""

    module: torch.nn.Module
    path: str
    weight_key: Optional[str] = None
    loras: list[tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=list)  # (down, up, scale)
    weight_patches: list = field(default_factory=list)  # fallback: ComfyUI computes ΔW
    bias_key: Optional[str] = None
    bias_patches: list = field(default_factory=list)
    _cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        weight = getattr(self.module, "weight", None)
        self.conv_fn = None
        self.conv_args: dict = {}
        if weight is None:
            self.kind = "none"
        elif weight.ndim == 2 and hasattr(self.module, "in_features"):
            self.kind = "linear"
        elif weight.ndim in _CONV and hasattr(self.module, "stride"):
            self.kind = "conv"
            m = self.module
            if getattr(m, "padding_mode", "zeros") != "zeros":
                raise DCOError(f"The layer {self.path} pads with {m.padding_mode!r}; a LoRA on it cannot be applied as a bypass.")
            self.conv_fn = _CONV[weight.ndim]
            self.conv_args = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}
        else:
            self.kind = "other"

    def _effective(self, name: str, device: torch.device) -> torch.Tensor:
        """The layer's weight or bias as `model` uses it (base patches included), in fp32."""
        value = getattr(self.module, name).to(device=device, dtype=torch.float32, copy=True)
        for fn in getattr(self.module, f"{name}_function", []) or []:
            value = fn(value)
        return value.float()

    def _tensors(self, x: torch.Tensor) -> dict:
        key = (x.device, x.dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        import comfy.lora  # lazy: only the fallback needs ComfyUI's patch maths

        out: dict = {}
        if self.loras:
            # every LoRA of this layer folded into one (down, up) pair: one matmul pair per call
            down = torch.cat([d.to(x.device, torch.float32).flatten(1) for d, _, _ in self.loras])
            up = torch.cat([u.to(x.device, torch.float32).flatten(1) * s for _, u, s in self.loras], dim=1)
            if self.kind == "conv":
                kernel = self.module.weight.shape[2:]
                down = down.view(down.shape[0], -1, *kernel)
                up = up.view(up.shape[0], up.shape[1], *([1] * len(kernel)))
            out["down"], out["up"] = down.to(x.dtype), up.to(x.dtype)
        if self.weight_patches:
            w = self._effective("weight", x.device)
            delta = comfy.lora.calculate_weight(self.weight_patches, w.clone(), self.weight_key, intermediate_dtype=torch.float32) - w
            out["dw"] = delta.to(x.dtype)
        if self.bias_patches:
            b = self._effective("bias", x.device)
            delta = comfy.lora.calculate_weight(self.bias_patches, b.clone(), self.bias_key, intermediate_dtype=torch.float32) - b
            out["db"] = delta.to(x.dtype)
        self._cache[key] = out
        return out

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        t = self._tensors(x)
        conv = self.conv_fn
        result = None
        if "down" in t:
            if conv is not None:
                result = conv(conv(x, t["down"], None, **self.conv_args), t["up"])
            else:
                result = F.linear(F.linear(x, t["down"]), t["up"])
        if "dw" in t:
            extra = conv(x, t["dw"], None, **self.conv_args) if conv is not None else F.linear(x, t["dw"])
            result = extra if result is None else result + extra
        if "db" in t:
            db = t["db"].view(-1, *([1] * (x.ndim - 2))) if conv else t["db"]
            result = db if result is None else result + db  # a bias alone broadcasts in _add
        return result


class BypassLoRA:
    """Forward hooks on `root` (a ComfyUI BaseModel) that add `patches` while `rows` is set.

    `rows` is None (off), `ALL_ROWS`, or the batch rows that belong to the token prompt (a slice
    or an index tensor), in which case `batch` is the model input's batch size. The guider sets
    `request` (None, `ALL_ROWS` or the token prompt's index) and an APPLY_MODEL wrapper turns it
    into `rows` for each model call; `saw_rows`/`fired` let the guider check the hooks really ran.
    """

    def __init__(self, root: torch.nn.Module, patches: dict[str, list]):
        self.rows: Rows = None
        self.request: Any = None
        self.batch = 0
        self.fired = 0
        self.saw_rows = False
        self._handles: list = []
        self._deltas = self._build(root, patches)

    @property
    def empty(self) -> bool:
        return not self._deltas

    @staticmethod
    def _build(root: torch.nn.Module, patches: dict[str, list]) -> list[_ModuleDelta]:
        by_path: dict[str, _ModuleDelta] = {}
        fallback = 0
        for key, plist in patches.items():
            path, _, attr = key.rpartition(".")
            try:
                module = root.get_submodule(path)
            except AttributeError:
                module = None
            if module is None or attr not in ("weight", "bias"):
                raise DCOError(f"model_ft patches {key}, which is not a layer weight of this model; it cannot be applied.")
            entry = by_path.setdefault(path, _ModuleDelta(module=module, path=path))
            if entry.kind not in ("linear", "conv"):
                raise DCOError(
                    f"model_ft patches {key}, a {type(module).__name__} weight. The reward-guidance guider "
                    "applies LoRAs to Linear and Conv layers only; use a LoRA without normalisation-layer weights."
                )
            if attr == "bias":
                entry.bias_key = key
                entry.bias_patches.extend(plist)
                continue
            entry.weight_key = key
            for patch in plist:
                lora = _plain_lora(patch)
                groups = getattr(module, "groups", 1)
                if lora is not None and groups == 1:
                    entry.loras.append(lora)
                else:
                    entry.weight_patches.append(patch)
                    fallback += 1
        if fallback:
            log.info("DCO: %d patch(es) are not plain LoRA; applying them as precomputed weight deltas.", fallback)
        return list(by_path.values())

    # ------------------------------------------------------------------ hooks
    def install(self) -> None:
        if self._handles:
            return
        try:
            for entry in self._deltas:
                self._handles.append(entry.module.register_forward_hook(self._hook(entry)))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Take every hook off and drop the device copies (safe to call twice)."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self.rows = None
        for entry in self._deltas:
            entry._cache.clear()

    def _hook(self, entry: _ModuleDelta):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
            rows = self.rows
            if rows is None or not args:
                return None
            x = args[0]
            self.fired += 1
            if rows is ALL_ROWS:
                return _add(output, entry.delta(x), ALL_ROWS)
            if x.shape[0] != self.batch or output.shape[0] != self.batch:
                raise RowLayoutError(f"{entry.path} saw batch {x.shape[0]}, the model input had {self.batch}.")
            return _add(output, entry.delta(x[rows]), rows)

        return hook

    # ------------------------------------------------------------------ row selection
    def select_rows(self, chunks: list[int], token_index: int, batch: int) -> None:
        """Switch the hooks on for the chunks of `chunks` (ComfyUI's `cond_or_uncond`) equal to
        `token_index`; each chunk is `batch // len(chunks)` rows."""
        picked = [i for i, c in enumerate(chunks) if c == token_index]
        self.batch = batch
        if not picked:
            self.rows = None
            return
        self.saw_rows = True
        if len(picked) == len(chunks):
            self.rows = ALL_ROWS
            return
        size = batch // len(chunks)
        if size * len(chunks) != batch:
            raise RowLayoutError(f"a batch of {batch} rows does not split into {len(chunks)} prompts.")
        if picked == list(range(picked[0], picked[-1] + 1)):
            self.rows = slice(picked[0] * size, (picked[-1] + 1) * size)
        else:
            self.rows = torch.cat([torch.arange(i * size, (i + 1) * size) for i in picked])


def _add(output: torch.Tensor, delta: torch.Tensor, rows: Union[slice, torch.Tensor]) -> torch.Tensor:
    """`output` with `delta` added on `rows`, in place when autograd and inference mode allow it."""
    in_place = not output.requires_grad and (torch.is_inference_mode_enabled() or not output.is_inference())
    delta = delta.to(output.dtype)
    if isinstance(rows, slice):
        if in_place:
            output[rows] += delta
            return output
        if rows == ALL_ROWS:
            return output + delta
        rows = torch.arange(output.shape[0], device=output.device)[rows]
    rows = rows.to(output.device)
    delta = delta.expand((rows.shape[0],) + tuple(output.shape[1:]))
    if in_place:
        return output.index_add_(0, rows, delta)
    return output.index_add(0, rows, delta)


def lora_bytes(patches: dict[str, list]) -> int:
    """Bytes of the tensors held by `patches` (the LoRA's own size)."""
    total = 0
    seen: set[int] = set()
    for plist in patches.values():
        for patch in plist:
            for t in getattr(patch[1], "weights", ()) or ():
                if isinstance(t, torch.Tensor) and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total

