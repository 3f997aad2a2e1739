"""Datasets: caption folders, the reference config.json, base prompts, image handling, latent cache."""

import json

import pytest
import torch
from PIL import Image

from helpers import SEED_DIR, quick_config, write_images
from dco_train.config import TrainConfig
from dco_train.data import encode_dataset, load_dataset_spec, open_rgb, prepare_image, vae_encoder
from dco_train.errors import DCOError

needs_seed = pytest.mark.skipif(not SEED_DIR.is_dir(), reason=f"reference seed data not found at {SEED_DIR}")


def test_folder_with_captions_and_derived_base_prompts(subject_dir):
    spec = load_dataset_spec(quick_config(data_dir=str(subject_dir)))
    assert [s.image.name for s in spec.samples] == ["img0.png", "img1.png", "img2.png"]
    assert spec.samples[0].prompt == "a photo of a <obj> on a table"
    assert spec.samples[0].base_prompt == "a photo of a toy on a table"
    assert spec.tokens == {"<obj>": "toy"}


def test_without_ti_the_base_prompt_is_the_caption(style_dir):
    spec = load_dataset_spec(TrainConfig.style(data_dir=str(style_dir)))
    assert spec.samples[0].base_prompt == spec.samples[0].prompt


@needs_seed
def test_reference_configs_parse():
    cfg_dir = SEED_DIR / "dataset/dreambooth/dog/config.json"
    full = load_dataset_spec(TrainConfig.subject(config_dir=str(cfg_dir), config_name="full_ti"))
    assert len(full.samples) == 5 and all(s.image.is_file() for s in full.samples)
    assert full.tokens == {"<dog>": "dog"}
    assert full.samples[1].base_prompt == "a low-angle photo of a dog sitting on a ledge in front of blossom trees, macro style"
    db = load_dataset_spec(TrainConfig(config_dir=str(cfg_dir), config_name="dreambooth"))
    assert db.samples[0].prompt == "a photo of sks dog"
    style = load_dataset_spec(TrainConfig.style(config_dir=str(SEED_DIR / "dataset/styledrop/config.json"), config_name="style"))
    assert style.samples[0].image.name == "style.jpg"


@needs_seed
def test_base_prompts_are_derived_when_the_config_has_none(tmp_path):
    src = json.loads((SEED_DIR / "dataset/dreambooth/dog/config.json").read_text())["full_ti"]
    entry = {k: v for k, v in src.items() if k != "base_prompts"}
    entry["images"] = [str(SEED_DIR / p) for p in entry["images"]]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"mine": entry}))
    spec = load_dataset_spec(TrainConfig.subject(config_dir=str(path), config_name="mine"))
    assert [s.base_prompt for s in spec.samples] == src["base_prompts"]


@needs_seed
def test_readme_config_name_style_1_lists_the_real_names():
    with pytest.raises(DCOError, match="no config named 'style_1'.*available names are: style"):
        load_dataset_spec(TrainConfig.style(config_dir=str(SEED_DIR / "dataset/styledrop/config.json"), config_name="style_1"))


def test_exif_rotation_alpha_and_greyscale(tmp_path):
    im = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert open_rgb(tmp_path / "rot.jpg").size == (20, 40)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.save(tmp_path / "alpha.png")
    assert open_rgb(tmp_path / "alpha.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    g = open_rgb(tmp_path / "grey.png")
    assert g.mode == "RGB" and g.getpixel((1, 1)) == (77, 77, 77)


def test_resize_and_center_crop_record_sdxl_time_ids():
    image = Image.new("RGB", (200, 100))
    pixels, time_ids = prepare_image(image, (64, 64))
    assert pixels.shape == (3, 64, 64) and float(pixels.min()) >= -1 and float(pixels.max()) <= 1
    # original (h, w), crop (top, left), target (h, w): 200x100 scaled to 128x64, 32 px cut on the left
    assert time_ids.tolist() == [100, 200, 0, 32, 64, 64]


def test_buckets_keep_the_aspect_ratio(tmp_path):
    write_images(tmp_path / "d", ["a <obj>", "a <obj>"], size=(256, 128))
    cfg = quick_config(data_dir=str(tmp_path / "d"), buckets=True, resolution=128)
    from dco_train.data import target_size

    h, w = target_size(256, 128, cfg)
    assert w > h and h % 64 == 0 and w % 64 == 0


class CountingVAE(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae, self.calls, self.config = vae, 0, vae.config

    def encode(self, x):
        self.calls += 1
        return self.vae.encode(x)


def test_latents_are_encoded_once_and_cached_with_their_spread(tiny, subject_dir):
    vae = CountingVAE(tiny.vae)
    cfg = quick_config(data_dir=str(subject_dir), random_flip=True)
    data = encode_dataset(vae_encoder(vae), load_dataset_spec(cfg), cfg)
    assert vae.calls == 6  # 3 images + their mirrors, once each
    item = data.items[0]
    assert item.mean.shape == (4, 8, 8) and item.std is not None and float(item.std.min()) > 0
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(item.draw(g1, False), item.draw(g2, False))
    assert not torch.equal(item.draw(g1, False), item.draw(g1, True))
    with torch.no_grad():
        direct = tiny.vae.encode(prepare_image(open_rgb(item.image_path), (64, 64))[0][None]).latent_dist.mean[0]
    assert torch.allclose(item.mean, direct * tiny.vae.config.scaling_factor, atol=1e-6)


def test_word_like_tokens_only_match_whole_words(tmp_path):
    from dco_train.text import contains_token, replace_tokens

    assert replace_tokens("asks a sks dog, sks!", {"sks": "dog"}) == "asks a dog dog, dog!"
    assert replace_tokens("a <dog2> and a <dog>", {"<dog>": "dog", "<dog2>": "puppy"}) == "a puppy and a dog"
    assert not contains_token("he asks for it", ["sks"]) and contains_token("a sks dog", ["sks"])
    write_images(tmp_path / "d", ["a photo that asks nothing"])
    with pytest.raises(DCOError, match="does not contain sks"):
        load_dataset_spec(quick_config(data_dir=str(tmp_path / "d"), tokens={"sks": "dog"}))
