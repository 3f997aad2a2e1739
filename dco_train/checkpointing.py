"""A run's checkpoints (save, resume) and the staging of its final files.

The file format is `checkpoint.py`'s; this unit gathers what a checkpoint holds from the running
trainer (LoRA, TI rows, optimizer, schedules, data order, every process's RNG) and puts it back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import checkpoint as ckpt_io
from .errors import DCOError
from .formats import output_error
from .lora import load_lora_state_dict, lora_state_dict

if TYPE_CHECKING:
    from .train import _Trainer

# Settings that may differ between a checkpoint and the run that resumes it.
RESUME_MAY_CHANGE = {
    "max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "validation_prompts", "validation_every",
    "validation_steps", "validation_cfg", "validation_rg", "validation_seed", "drift_every", "drift_prompts",
}


def lora_states(tr: "_Trainer") -> dict[str, dict[str, torch.Tensor]]:
    states = {"unet": lora_state_dict(tr.comps.unet)}
    if tr.cfg.train_text_encoder_lora:
        states["text_encoder"] = lora_state_dict(tr.comps.text_encoder)
        states["text_encoder_2"] = lora_state_dict(tr.comps.text_encoder_2)
    return states


def save_checkpoint(tr: "_Trainer") -> Path:
    """Write checkpoint-<step> (every process takes part: the RNG states are gathered)."""
    rng = tr.generator.get_state()
    if tr.world > 1:
        rng = tr.acc.gather(rng.to(tr.device)).cpu().view(tr.world, -1)
        rngs = list(rng)
    else:
        rngs = [rng]
    path = tr.run.checkpoint_dir / f"checkpoint-{tr.step}"
    if tr.is_main:
        state = ckpt_io.CheckpointState(
            step=tr.step, lora=lora_states(tr), optimizer=tr.optimizer.optimizer.state_dict(),
            lr_scheduler=tr.lr_scheduler.state_dict(), data_order=tr.order.state_dict(), rng=rngs,
            config=tr.cfg.to_dict(), embeddings=tr.token_set.to_embeddings() if tr.token_set else None,
            scaler=tr.acc.scaler.state_dict() if tr.acc.scaler is not None else None,
        )
        ckpt_io.save_checkpoint(path, state)
        ckpt_io.prune_checkpoints(tr.run.checkpoint_dir, tr.cfg.checkpoints_total_limit)
    tr.acc.wait_for_everyone()
    tr.checkpoints = ckpt_io.list_checkpoints(tr.run.checkpoint_dir)
    return path


def resume(tr: "_Trainer", folder: Path) -> None:
    """Put the trainer back in the state of the checkpoint `folder`, refusing changed settings."""
    state = ckpt_io.load_checkpoint(folder)
    saved = {k: v for k, v in state.config.items() if k not in RESUME_MAY_CHANGE}
    now = {k: v for k, v in tr.cfg.to_dict().items() if k not in RESUME_MAY_CHANGE}
    changed = sorted(k for k in now if saved.get(k) != now[k])
    if changed:
        raise DCOError(
            f"The checkpoint {folder} was trained with different settings ({', '.join(changed)}); "
            "resume with the same settings or start a new run."
        )
    load_lora_state_dict(tr.comps.unet, state.lora["unet"])
    if tr.cfg.train_text_encoder_lora:
        load_lora_state_dict(tr.comps.text_encoder, state.lora["text_encoder"])
        load_lora_state_dict(tr.comps.text_encoder_2, state.lora["text_encoder_2"])
    if tr.token_set is not None:
        if state.embeddings is None:
            raise DCOError(f"The checkpoint {folder} holds no token rows, but this run trains tokens.")
        tr.token_set.load_rows_(state.embeddings)
    tr.optimizer.optimizer.load_state_dict(state.optimizer)
    tr.lr_scheduler.load_state_dict(state.lr_scheduler)
    if state.scaler and tr.acc.scaler is not None:
        tr.acc.scaler.load_state_dict(state.scaler)
    tr.order.load_state_dict(state.data_order)
    if len(state.rng) != tr.world:
        raise DCOError(f"The checkpoint {folder} was written by {len(state.rng)} process(es); resume with as many.")
    tr.generator.set_state(state.rng[tr.rank])
    tr.step = state.step
    tr.monitor.restore_log(tr.step)
    tr.checkpoints = ckpt_io.list_checkpoints(tr.run.checkpoint_dir)
    tr.status(f"Resumed from {folder} at step {tr.step}")


class StagedFiles:
    """Final files written under temporary names beside their targets and renamed in together by
    `commit`, so a Cancel or an error during the save leaves none of them (and no earlier file of
    the same name replaced). The temporary names start with a dot and end in `.staged`, so no
    model list shows them."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path]] = []

    def path(self, final: Path) -> Path:
        staged = final.with_name(f".{final.name}.staged")
        self.pairs.append((staged, final))
        return staged

    def commit(self) -> None:
        for staged, final in self.pairs:
            try:
                os.replace(staged, final)
            except OSError as exc:
                raise output_error(final, exc) from exc
        self.pairs = []

    def discard(self) -> None:
        for staged, _ in self.pairs:
            staged.unlink(missing_ok=True)
        self.pairs = []
