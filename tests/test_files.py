"""The files we write: kohya LoRA keys, diffusers interop, embeddings, atomic writes."""

import pytest
import torch
from safetensors import safe_open

from helpers import quick_config
from dco_train.errors import DCOError
from dco_train.formats import atomic_write, load_embeddings, load_lora, safe_output_path
from dco_train.text import encode_prompts
from dco_train.tiny import HIDDEN_G, HIDDEN_L, build_tiny_sdxl
from dco_train.train import RunOptions, train


@pytest.fixture
def trained(tiny, subject_dir, tmp_path):
    cfg = quick_config(data_dir=str(subject_dir), max_train_steps=3, learning_rate=1e-2, text_encoder_lr=1e-2,
                       train_text_encoder_lora=True, lora_alpha=2.0)
    run = RunOptions(output_dir=tmp_path / "out", progress_bar=False, log_with=None, save_precision="fp32")
    return train(cfg, tiny, run)


def test_lora_file_has_only_kohya_keys_with_alpha_everywhere(trained):
    with safe_open(str(trained.lora), "pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
        alpha = fh.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in keys)
    modules = {k.split(".")[0] for k in keys}
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(keys), m
    assert any(m.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q") for m in modules)
    assert any(m.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for m in modules)
    assert any(m.startswith("lora_te2_text_model_encoder_layers_0_self_attn_out_proj") for m in modules)
    # 4 transformer blocks (down, mid, 2 up) x attn1/attn2 x to_q/k/v/out.0: every target is saved
    assert len([m for m in modules if m.startswith("lora_unet_")]) == 4 * 2 * 4
    assert alpha.item() == 2.0  # the real alpha, not the rank
    assert meta["ss_network_dim"] == "4" and "dco.config" in meta


def test_diffusers_load_lora_weights_reproduces_the_trained_unet(trained, tokenizer_dir):
    fresh = build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir)
    pipe = fresh.pipeline()
    pipe.load_lora_weights(str(trained.lora))
    g = torch.Generator().manual_seed(0)
    x, c, p = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 128, generator=g), torch.randn(2, 64, generator=g)
    kw = dict(added_cond_kwargs={"text_embeds": p, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)})
    with torch.no_grad():
        ours = trained.components.unet(x, torch.tensor([300, 700]), c, **kw).sample
        theirs = pipe.unet(x, torch.tensor([300, 700]), c, **kw).sample
        base = build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir).unet(x, torch.tensor([300, 700]), c, **kw).sample
    assert (ours - base).abs().max() > 1e-3  # the LoRA does something
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()  # fp32 file: only rounding


def test_embeddings_load_in_diffusers_and_encode_as_in_training(trained, tokenizer_dir):
    emb = load_embeddings(trained.embeddings)
    assert emb.tokens == ["<obj>"] and emb.initializers == ["toy"]
    assert emb.clip_l.shape == (1, HIDDEN_L) and emb.clip_g.shape == (1, HIDDEN_G)
    prompt = ["a photo of a <obj> on the beach"]
    comps = trained.components
    with torch.no_grad():
        ours = encode_prompts(comps.tokenizers, comps.text_encoders, prompt)
    pipe = build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir).pipeline()
    pipe.load_textual_inversion(emb.clip_l, token=emb.tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb.clip_g, token=emb.tokens, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    pipe.load_lora_weights(str(trained.lora))  # the text-encoder LoRA is part of the trained encoders
    with torch.no_grad():
        theirs = encode_prompts([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], prompt)
    assert torch.allclose(ours.embeds, theirs.embeds, atol=1e-5)
    assert torch.allclose(ours.pooled, theirs.pooled, atol=1e-5)


def test_lora_file_reads_back(trained):
    lora = load_lora(trained.lora)
    assert set(lora.modules) == {"unet", "text_encoder", "text_encoder_2"}
    m = next(iter(lora.modules["unet"].values()))
    assert m.rank == 4 and m.alpha == 2.0 and m.scale == 0.5


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "x.safetensors"

    def boom(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,words", [
    ("../escape", r"\.\."), ("/abs/path", "absolute"), ("a/../../b", r"\.\."), ("", "empty"), ("sub//x", "empty"),
])
def test_output_names_cannot_escape(tmp_path, name, words):
    with pytest.raises(DCOError, match=words):
        safe_output_path(tmp_path, name)


def test_output_names_refuse_to_overwrite(tmp_path):
    (tmp_path / "mine.safetensors").write_bytes(b"x")
    with pytest.raises(DCOError, match="already exists"):
        safe_output_path(tmp_path, "mine")
    assert safe_output_path(tmp_path, "mine", overwrite=True) == (tmp_path / "mine.safetensors").resolve()
    assert safe_output_path(tmp_path, "dco/dog").parent.name == "dco"


# ------------------------------------------------------------------------------- permissions, disks
posix_only = pytest.mark.skipif(__import__("os").name == "nt", reason="Windows files have no mode bits")


@posix_only
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, mask, mode):
    import os

    from dco_train.formats import save_safetensors

    old = os.umask(mask)
    try:
        path = save_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("err,words", [(28, "the disk is full"), (30, "the file system is read-only"), (13, "permission is denied")])
def test_a_failed_write_names_the_path_and_keeps_the_earlier_file(tmp_path, err, words):
    """A writer that fails as a full disk (ENOSPC), a read-only file system (EROFS) or a forbidden
    folder (EACCES) would: a sentence naming the file, the earlier file intact, no temporary left."""
    import errno
    import os

    code = {28: errno.ENOSPC, 30: errno.EROFS, 13: errno.EACCES}[err]
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"earlier run")

    def fails(tmp):
        tmp.write_bytes(b"half")
        raise OSError(code, os.strerror(code))

    with pytest.raises(DCOError, match=f"Cannot write {target}: {words}"):
        atomic_write(target, fails)
    assert target.read_bytes() == b"earlier run" and list(tmp_path.iterdir()) == [target]


def _checkpoint(step=5, value=1.0):
    from dco_train.checkpoint import CheckpointState

    return CheckpointState(step=step, lora={"unet": {"a.lora_A.weight": torch.full((2, 2), value)}},
                           optimizer={"state": {0: {"step": torch.ones(1)}}, "param_groups": []}, lr_scheduler={}, data_order={},
                           rng=[torch.zeros(4, dtype=torch.uint8)], config={})


def test_resaving_a_checkpoint_replaces_it_and_leaves_nothing_aside(tmp_path):
    from dco_train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "checkpoint-5", _checkpoint(value=1.0))
    save_checkpoint(tmp_path / "checkpoint-5", _checkpoint(value=2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-5"]
    assert float(load_checkpoint(list_checkpoints(tmp_path)[0]).lora["unet"]["a.lora_A.weight"][0, 0]) == 2.0


def test_an_interrupted_resave_is_recovered(tmp_path):
    """A crash between 'rename the old checkpoint aside' and 'rename the new one in' leaves only
    checkpoint-5.old: it is put back, so a checkpoint is never lost."""
    from dco_train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path / "checkpoint-5", _checkpoint(value=1.0))
    (tmp_path / "checkpoint-5").rename(tmp_path / "checkpoint-5.old")
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["checkpoint-5"]
    assert float(load_checkpoint(found[0]).lora["unet"]["a.lora_A.weight"][0, 0]) == 1.0


@posix_only
def test_checkpoint_folders_honour_the_umask(tmp_path):
    import os

    from dco_train.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        folder = save_checkpoint(tmp_path / "checkpoint-1", _checkpoint(step=1))
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755 and (folder / "state.json").stat().st_mode & 0o777 == 0o644


def test_a_truncated_state_json_is_named(tmp_path):
    from dco_train.checkpoint import load_checkpoint, save_checkpoint

    folder = save_checkpoint(tmp_path / "checkpoint-5", _checkpoint())
    text = (folder / "state.json").read_text()
    (folder / "state.json").write_text(text[: len(text) // 2])
    with pytest.raises(DCOError, match=r"checkpoint-5/state\.json is damaged or incomplete.*earlier checkpoint"):
        load_checkpoint(folder)
