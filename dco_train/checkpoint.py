"""Resumable checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint folder `checkpoint-<step>` holds everything an exact resume needs: the LoRA (fp32),
the TI rows, the optimizer state, the LR scheduler and grad-scaler state, the step, the data order
and every process's RNG state, plus the config. It is written into a temporary folder that is
renamed into place, so an interruption never leaves a half-written checkpoint under its name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import DCOError
from .formats import TokenEmbeddings, load_embeddings, load_safetensors, save_embeddings, save_safetensors

_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class CheckpointState:
    step: int
    lora: dict[str, dict[str, torch.Tensor]]  # component -> peft state dict (fp32)
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    data_order: dict[str, Any]
    rng: list[torch.Tensor]  # one generator state per process
    config: dict[str, Any]
    embeddings: TokenEmbeddings | None = None
    scaler: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: str | os.PathLike, ckpt: CheckpointState) -> Path:
    """Write `ckpt` to `folder` (checkpoint-<step>) atomically; an existing one is replaced."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        lora = {f"{comp}::{k}": v.float() for comp, sd in ckpt.lora.items() for k, v in sd.items()}
        save_safetensors(tmp / "lora.safetensors", lora)
        if ckpt.embeddings is not None:
            save_embeddings(tmp / "embeddings.safetensors", ckpt.embeddings)
        opt_tensors, opt_meta = _optimizer_to_files(ckpt.optimizer)
        save_safetensors(tmp / "optimizer.safetensors", opt_tensors)
        save_safetensors(tmp / "rng.safetensors", {f"process.{i}": s for i, s in enumerate(ckpt.rng)})
        meta = {
            "step": ckpt.step,
            "optimizer": opt_meta,
            "lr_scheduler": ckpt.lr_scheduler,
            "scaler": ckpt.scaler,
            "data_order": ckpt.data_order,
            "config": ckpt.config,
            "extra": ckpt.extra,
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=_json_default), encoding="utf-8")
        if folder.exists():
            old = folder.with_name(folder.name + ".old")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _json_default(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"Cannot store {type(value).__name__} in a checkpoint.")


def load_checkpoint(folder: str | os.PathLike) -> CheckpointState:
    folder = Path(folder)
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise DCOError(f"{folder} is not a checkpoint folder (no state.json); give a checkpoint-<step> folder or 'latest'.")
    meta = json.loads(state_file.read_text(encoding="utf-8"))
    lora_flat, _ = load_safetensors(folder / "lora.safetensors")
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora_flat.items():
        comp, name = key.split("::", 1)
        lora.setdefault(comp, {})[name] = value
    opt_tensors, _ = load_safetensors(folder / "optimizer.safetensors")
    rng_flat, _ = load_safetensors(folder / "rng.safetensors")
    rng = [rng_flat[f"process.{i}"] for i in range(len(rng_flat))]
    emb_path = folder / "embeddings.safetensors"
    return CheckpointState(
        step=int(meta["step"]),
        lora=lora,
        optimizer=_optimizer_from_files(opt_tensors, meta["optimizer"]),
        lr_scheduler=meta["lr_scheduler"],
        data_order=meta["data_order"],
        rng=rng,
        config=meta["config"],
        embeddings=load_embeddings(emb_path) if emb_path.is_file() else None,
        scaler=meta.get("scaler"),
        extra=meta.get("extra", {}),
    )


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under `root`, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(root: str | os.PathLike, spec: str | None) -> Path | None:
    """`latest` -> the newest checkpoint under `root` (None if there is none); a path -> that path."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(spec)
    if not path.is_dir() and (Path(root) / spec).is_dir():
        path = Path(root) / spec
    if not path.is_dir():
        raise DCOError(f"The checkpoint {spec} does not exist; give 'latest' or a checkpoint-<step> folder.")
    return path


def prune_checkpoints(root: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most `keep` remain; returns what was removed."""
    if keep is None:
        return []
    found = list_checkpoints(root)
    doomed = found[: max(0, len(found) - keep)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed
