"""What a trained LoRA file records for DCO Load Subject (formats.subject_metadata), and reading it back."""

import hashlib
import json

import pytest

from helpers import quick_config
from dco_train.config import TrainConfig
from dco_train.errors import DCOError
from dco_train.formats import read_metadata, read_subject_metadata, subject_metadata
from dco_train.train import RunOptions, train


def test_a_subject_run_records_its_embeddings_file_tokens_words_and_scales(tiny, subject_dir, tmp_path):
    cfg = quick_config(data_dir=str(subject_dir), max_train_steps=1, validation_cfg=6.0, validation_rg=2.5)
    run = RunOptions(output_dir=tmp_path / "out", lora_path=tmp_path / "loras" / "me.safetensors",
                     embeddings_path=tmp_path / "emb" / "me_tokens.safetensors", progress_bar=False, log_with=None)
    (tmp_path / "loras").mkdir()
    (tmp_path / "emb").mkdir()
    result = train(cfg, tiny, run)
    info = read_subject_metadata(read_metadata(result.lora))
    assert info.embeddings == "me_tokens.safetensors"
    assert info.embeddings_sha256 == hashlib.sha256(result.embeddings.read_bytes()).hexdigest()
    assert info.tokens == ["<obj>"] and info.word_map == {"<obj>": "toy"}
    assert (info.cfg, info.rg) == (6.0, 2.5)


def test_a_style_run_records_no_embeddings_but_the_scales(tiny, style_dir, tmp_path):
    cfg = TrainConfig.style(data_dir=str(style_dir), resolution=64, max_train_steps=1, checkpointing_steps=0,
                            drift_every=0, mixed_precision="no", rank=4)
    result = train(cfg, tiny, RunOptions(output_dir=tmp_path / "out", progress_bar=False, log_with=None))
    assert result.embeddings is None
    info = read_subject_metadata(read_metadata(result.lora))
    assert info.embeddings is None and info.embeddings_sha256 is None and info.tokens == []
    assert (info.cfg, info.rg) == (7.5, 3.0)


def test_subject_metadata_hashes_the_file_bytes(tmp_path):
    path = tmp_path / "dog.safetensors"
    path.write_bytes(b"not really a tensor file")
    meta = subject_metadata(path, 7.5, 3)
    assert meta == {"dco.cfg": "7.5", "dco.rg": "3.0", "dco.embeddings": "dog.safetensors",
                    "dco.embeddings_sha256": hashlib.sha256(b"not really a tensor file").hexdigest()}
    assert all(isinstance(v, str) for v in meta.values())  # safetensors metadata is str -> str


def test_files_from_before_the_change_give_tokens_and_the_preview_scales_but_no_embeddings():
    old = {"dco.tokens": '["<dog>"]', "dco.initializers": '["dog"]',
           "dco.config": json.dumps({"validation_cfg": 5.0, "validation_rg": 2.0})}
    info = read_subject_metadata(old)
    assert info.word_map == {"<dog>": "dog"} and info.embeddings is None and (info.cfg, info.rg) == (5.0, 2.0)


def test_a_file_without_metadata_reads_as_empty():
    info = read_subject_metadata({"ss_network_dim": "32"})
    assert info.tokens == [] and info.embeddings is None and info.cfg is None and info.rg is None


def test_missing_words_read_as_empty_words():
    info = read_subject_metadata({"dco.tokens": '["<a>", "<b>"]', "dco.initializers": '["x"]'})
    assert info.word_map == {"<a>": "x", "<b>": ""}


@pytest.mark.parametrize("value", ["not json", '{"<dog>": "dog"}', "[1, 2]"])
def test_damaged_token_metadata_is_refused_by_name(value):
    with pytest.raises(DCOError, match=r"subject\.safetensors: its dco\.tokens metadata is not a list of strings"):
        read_subject_metadata({"dco.tokens": value}, "subject.safetensors")
