"""Resumable checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint folder `checkpoint-<step>` holds everything an exact resume needs: the LoRA (fp32),
the TI rows, the optimizer state, the LR scheduler and grad-scaler state, the step, the data order
and every process's RNG state, plus the config. It is written into a temporary folder that is
renamed into place, so an interruption never leaves a half-written checkpoint under its name.
Re-saving the same step moves the old folder aside (`checkpoint-<step>.old`) before the new one is
renamed in; folders cannot be swapped in one portable step, so if the process dies between the two
renames the aside copy is renamed back the next time checkpoints are listed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import DCOError
from .formats import (TokenEmbeddings, current_umask, load_embeddings, load_safetensors, output_error, save_embeddings,
                      save_safetensors)

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
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        if os.name != "nt":
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's folder is private (0700); honour the umask
    except OSError as exc:
        raise output_error(folder, exc) from exc
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
        }
        text = json.dumps(meta, indent=1, default=_json_default)
        try:
            (tmp / "state.json").write_text(text, encoding="utf-8")
        except OSError as exc:
            raise output_error(folder / "state.json", exc) from exc
        _swap_in(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _aside(folder: Path) -> Path:
    return folder.with_name(folder.name + ".old")


def _swap_in(new: Path, folder: Path) -> None:
    """Rename `new` onto `folder`: the old folder is renamed aside first (Windows cannot rename over
    a folder), then the new one in, then the old one deleted. `_recover_aside` undoes a crash
    between the two renames."""
    try:
        if folder.exists():
            old = _aside(folder)
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
            os.replace(new, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(new, folder)
    except OSError as exc:
        raise output_error(folder, exc) from exc


def _recover_aside(root: Path) -> None:
    """A `checkpoint-<step>.old` without its `checkpoint-<step>` is a checkpoint whose re-save was
    interrupted between the two renames: put it back under its name."""
    for old in root.glob("checkpoint-*.old"):
        folder = old.with_name(old.name[: -len(".old")])
        if _NAME.match(folder.name) and old.is_dir() and not folder.exists():
            os.replace(old, folder)


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
    try:
        meta = json.loads(state_file.read_text(encoding="utf-8"))
        for key in ("step", "optimizer", "lr_scheduler", "data_order", "config"):
            meta[key]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise DCOError(
            f"{state_file} is damaged or incomplete ({exc}); the checkpoint cannot be resumed. Resume from an "
            "earlier checkpoint-<step> folder, or start again without --resume_from_checkpoint."
        ) from exc
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
    )


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoint folders under `root`, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    _recover_aside(root)
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
