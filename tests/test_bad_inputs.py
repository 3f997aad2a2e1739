"""Bad input: a clear error that names the file or field, and no partial output left behind."""

import json

import pytest
import torch

from helpers import quick_config, write_images
from dco_train.errors import DCOError
from dco_train.formats import load_embeddings, load_lora, save_embeddings, TokenEmbeddings
from dco_train.train import RunOptions, train


def _empty(tmp):
    (tmp / "data").mkdir()
    return dict(data_dir=str(tmp / "data"))


def _unreadable(tmp):
    write_images(tmp / "data", ["a <obj>", "a <obj>"])
    (tmp / "data" / "img1.png").write_bytes(b"this is not a png")
    return dict(data_dir=str(tmp / "data"))


def _caption_without_token(tmp):
    write_images(tmp / "data", ["a photo of a <obj>", "a photo of a toy"])
    return dict(data_dir=str(tmp / "data"))


def _missing_caption(tmp):
    write_images(tmp / "data", ["a <obj>", "a <obj>"])
    (tmp / "data" / "img1.txt").unlink()
    return dict(data_dir=str(tmp / "data"))


def _empty_caption(tmp):
    write_images(tmp / "data", ["a <obj>", "   "])
    return dict(data_dir=str(tmp / "data"))


def _no_folder(tmp):
    return dict(data_dir=str(tmp / "nowhere"))


def _token_in_vocab(tmp):
    write_images(tmp / "data", ["a photo of a dog</w>"])
    return dict(data_dir=str(tmp / "data"), tokens={"dog</w>": "dog"})


def _config(tmp, entry, name="mine"):
    write_images(tmp / "imgs", ["x", "y"])
    entry = {"images": [str(tmp / "imgs/img0.png"), str(tmp / "imgs/img1.png")], **entry}
    (tmp / "config.json").write_text(json.dumps({"mine": entry}))
    return dict(config_dir=str(tmp / "config.json"), config_name=name)


def _unknown_config_name(tmp):
    return _config(tmp, {"prompts": ["a <obj>", "a <obj>"]}, name="style_1")


def _prompt_count(tmp):
    return _config(tmp, {"prompts": ["a <obj>"]})


def _missing_image_in_config(tmp):
    kw = _config(tmp, {"prompts": ["a <obj>", "a <obj>"]})
    (tmp / "imgs/img1.png").unlink()
    return kw


def _bad_json(tmp):
    (tmp / "config.json").write_text("{not json")
    return dict(config_dir=str(tmp / "config.json"), config_name="x")


def _no_data(tmp):
    return {}


TRAIN_CASES = [
    (_empty, "has no images"),
    (_unreadable, r"Cannot read the image .*img1\.png"),
    (_caption_without_token, r"img1\.png .* does not contain <obj>"),
    (_missing_caption, r"img1\.png has no caption file img1\.txt"),
    (_empty_caption, r"caption file .*img1\.txt is empty"),
    (_no_folder, "does not exist"),
    (_token_in_vocab, "already in the tokenizer's vocabulary"),
    (_unknown_config_name, r"no config named 'style_1'; the available names are: mine"),
    (_prompt_count, "2 images but 1 prompts"),
    (_missing_image_in_config, r"img1\.png does not exist"),
    (_bad_json, "not valid JSON"),
    (_no_data, "No training data"),
]


@pytest.mark.parametrize("make,message", TRAIN_CASES, ids=[c[0].__name__.strip("_") for c in TRAIN_CASES])
def test_bad_training_input(tiny, tmp_path, make, message):
    out = tmp_path / "out"
    kw = make(tmp_path)
    with pytest.raises(DCOError, match=message):
        train(quick_config(**kw), tiny, RunOptions(output_dir=out, progress_bar=False, log_with=None))
    assert not out.exists(), "a failed run left output behind"


@pytest.mark.parametrize("kw,message", [
    (dict(rank=0), "rank must be a whole number of at least 1"),
    (dict(resolution=60), "multiple of 8"),
    (dict(max_train_steps=0), "max_train_steps"),
    (dict(train_batch_size=0), "train_batch_size"),
])
def test_bad_settings(kw, message):
    with pytest.raises(DCOError, match=message):
        quick_config(**kw)


def test_output_parent_must_exist(tiny, subject_dir, tmp_path):
    out = tmp_path / "missing" / "out"
    with pytest.raises(DCOError, match=r"parent .*missing does not exist"):
        train(quick_config(data_dir=str(subject_dir)), tiny, RunOptions(output_dir=out, progress_bar=False, log_with=None))
    assert not (tmp_path / "missing").exists()


def test_fp16_on_the_cpu(tiny, subject_dir, tmp_path):
    with pytest.raises(DCOError, match="fp16 mixed precision needs a CUDA GPU"):
        train(quick_config(data_dir=str(subject_dir), mixed_precision="fp16"), tiny,
              RunOptions(output_dir=tmp_path / "o", progress_bar=False, log_with=None, cpu=True))


def test_bad_files(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"pickle")
    with pytest.raises(DCOError, match="only safetensors"):
        load_lora(tmp_path / "x.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(DCOError, match="not a valid safetensors file"):
        load_embeddings(tmp_path / "broken.safetensors")
    save_embeddings(tmp_path / "e.safetensors", TokenEmbeddings(["<a>"], torch.zeros(1, 4), torch.zeros(1, 4)))
    with pytest.raises(DCOError, match=r"1 clip_l row\(s\) but 2 token\(s\)"):
        load_embeddings(tmp_path / "e.safetensors", tokens=["<a>", "<b>"])
    from safetensors.torch import save_file

    save_file({"clip_l": torch.zeros(1, 4), "clip_g": torch.zeros(1, 4)}, str(tmp_path / "ref.safetensors"))
    with pytest.raises(DCOError, match="does not record its tokens"):
        load_embeddings(tmp_path / "ref.safetensors")
    assert load_embeddings(tmp_path / "ref.safetensors", tokens=["<dog>"]).tokens == ["<dog>"]
