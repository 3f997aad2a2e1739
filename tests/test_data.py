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


# ------------------------------------------------------------------------------- every Pillow mode
def _saved(tmp_path, image, name: str, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def _mode_cases(tmp_path):
    """(file, the RGB pixel at (0, 0) after loading) for each Pillow mode a training image may have."""
    import numpy as np

    p_transparent = Image.new("P", (4, 4), 1)
    p_transparent.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    la = Image.new("LA", (4, 4), (50, 0))  # fully transparent grey -> white
    la.putpixel((1, 1), (50, 255))
    return {
        "I;16": (_saved(tmp_path, Image.fromarray(np.full((4, 4), 32896, np.uint16)), "i16.png"), (128, 128, 128)),
        "I": (_saved(tmp_path, Image.fromarray(np.full((4, 4), 65535, np.int32)), "i32.tif"), (255, 255, 255)),
        "I 8-bit range": (_saved(tmp_path, Image.fromarray(np.full((4, 4), 100, np.int32)), "i8.tif"), (100, 100, 100)),
        "F": (_saved(tmp_path, Image.fromarray(np.full((4, 4), 0.5, np.float32)), "f.tif"), (128, 128, 128)),
        "P transparent": (_saved(tmp_path, p_transparent, "p.png", transparency=1), (255, 255, 255)),
        "P opaque": (_saved(tmp_path, p_transparent, "p_opaque.png"), (200, 10, 10)),
        "LA": (_saved(tmp_path, la, "la.png"), (255, 255, 255)),
        "RGBA half": (_saved(tmp_path, Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "rgba.png"), (127, 127, 127)),
        "CMYK": (_saved(tmp_path, Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "cmyk.jpg", quality=100), (255, 0, 0)),
        "L": (_saved(tmp_path, Image.new("L", (4, 4), 77), "l.png"), (77, 77, 77)),
        "1": (_saved(tmp_path, Image.new("1", (4, 4), 1), "one.png"), (255, 255, 255)),
    }


@pytest.mark.parametrize("mode", ["I;16", "I", "I 8-bit range", "F", "P transparent", "P opaque", "LA", "RGBA half",
                                  "CMYK", "L", "1"])
def test_every_pillow_mode_loads_with_the_right_pixel_values(tmp_path, mode):
    path, expected = _mode_cases(tmp_path)[mode]
    image = open_rgb(path)
    assert image.mode == "RGB"
    got = image.getpixel((0, 0))
    assert all(abs(a - b) <= 3 for a, b in zip(got, expected)), (mode, got, expected)  # JPEG's CMYK rounding


def test_sixteen_bit_png_keeps_its_gradient(tmp_path):
    """A 16-bit PNG is scaled, not clipped: a dark-to-light ramp stays a ramp (it used to load white)."""
    import numpy as np

    ramp = np.linspace(0, 65535, 16).astype(np.uint16).reshape(4, 4)
    path = _saved(tmp_path, Image.fromarray(ramp), "ramp16.png")
    arr = np.asarray(open_rgb(path))[..., 0].reshape(-1)
    assert arr[0] == 0 and arr[-1] == 255 and (np.diff(arr.astype(int)) > 0).all()


# ------------------------------------------------------------------------------- captions
def test_caption_with_a_utf8_bom_loses_the_bom(tmp_path):
    write_images(tmp_path / "d", ["x"])
    (tmp_path / "d" / "img0.txt").write_bytes("\ufeffa photo of a <obj>".encode("utf-8"))
    spec = load_dataset_spec(quick_config(data_dir=str(tmp_path / "d")))
    assert spec.samples[0].prompt == "a photo of a <obj>"


def test_latin1_caption_is_refused_by_name(tmp_path):
    write_images(tmp_path / "d", ["x"])
    (tmp_path / "d" / "img0.txt").write_bytes("a photo of a <obj> in a café".encode("latin-1"))
    with pytest.raises(DCOError, match=r"img0\.txt is not UTF-8 text.*save it as UTF-8"):
        load_dataset_spec(quick_config(data_dir=str(tmp_path / "d")))


def test_config_json_with_a_bom_reads(tmp_path):
    write_images(tmp_path / "d", ["x"])
    entry = {"images": [str(tmp_path / "d" / "img0.png")], "prompts": ["a <obj>"], "inserting_tokens": ["<obj>"],
             "initializer_tokens": ["toy"]}
    (tmp_path / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"mine": entry}).encode())
    spec = load_dataset_spec(quick_config(config_dir=str(tmp_path / "config.json")))
    assert spec.samples[0].base_prompt == "a toy"


# ------------------------------------------------------------------------------- skipped, refused, upscaled
def test_a_gif_in_the_folder_is_named_in_a_warning(tmp_path, caplog):
    write_images(tmp_path / "d", ["a <obj>"])
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "anim.gif")
    (tmp_path / "d" / "anim.txt").write_text("a <obj>", encoding="utf-8")
    with caplog.at_level("WARNING", logger="dco_train.data"):
        spec = load_dataset_spec(quick_config(data_dir=str(tmp_path / "d")))
    assert len(spec.samples) == 1
    assert "anim.gif" in caplog.text and "GIF is not read" in caplog.text


def test_a_tiny_image_is_named_when_heavily_upscaled(tmp_path, caplog):
    (tmp_path / "d").mkdir()
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "d" / "img0.png")
    (tmp_path / "d" / "img0.txt").write_text("a <obj>", encoding="utf-8")
    cfg = quick_config(data_dir=str(tmp_path / "d"))
    with caplog.at_level("WARNING", logger="dco_train.data"):
        encode_dataset(lambda px: (px[:1, ::8, ::8], None), load_dataset_spec(cfg), cfg)
    assert "img0.png is 1x1 pixels and is enlarged 64.0x" in caplog.text


def test_no_warning_for_an_image_near_the_training_size(tmp_path, caplog):
    write_images(tmp_path / "d", ["a <obj>"], size=(48, 48))
    cfg = quick_config(data_dir=str(tmp_path / "d"))
    with caplog.at_level("WARNING", logger="dco_train.data"):
        encode_dataset(lambda px: (px[:1, ::8, ::8], None), load_dataset_spec(cfg), cfg)
    assert "enlarged" not in caplog.text


def test_a_decompression_bomb_is_refused_by_name(tmp_path, monkeypatch):
    write_images(tmp_path / "d", ["a <obj>"], size=(80, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own limit, lowered: 80x64 > 2 x 1000
    with pytest.raises(DCOError, match=r"img0\.png is too large to open safely.*Resize it"):
        open_rgb(tmp_path / "d" / "img0.png")


# ------------------------------------------------------------------------------- random crops flip
def test_random_crops_flip_when_random_flip_is_on(tmp_path):
    """With center_crop off the loop re-encodes a random crop each step; about half of them are
    mirrored (they never were). A horizontally asymmetric image tells the two apart."""
    im = Image.new("RGB", (64, 64), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 32, 64))  # left half white
    (tmp_path / "d").mkdir()
    im.save(tmp_path / "d" / "img0.png")
    (tmp_path / "d" / "img0.txt").write_text("a <obj>", encoding="utf-8")
    seen = []
    cfg = quick_config(data_dir=str(tmp_path / "d"), center_crop=False, random_flip=True)
    data = encode_dataset(lambda px: (px.clone(), None), load_dataset_spec(cfg), cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        pixels = data.encode_fn(0, g).mean
        seen.append(float(pixels[0, :, :8].mean()) > 0)  # white on the left = not mirrored
    assert 3 <= sum(seen) <= 17, seen
    off = quick_config(data_dir=str(tmp_path / "d"), center_crop=False, random_flip=False)
    plain = encode_dataset(lambda px: (px.clone(), None), load_dataset_spec(off), off)
    assert all(float(plain.encode_fn(0, g).mean[0, :, :8].mean()) > 0 for _ in range(10))


# ------------------------------------------------------------------------------- long captions, words
def test_a_caption_over_77_tokens_is_named_in_a_warning(tiny, caplog):
    from dco_train.text import encode_prompts

    long = "a photo of a " + " ".join(["red dog"] * 45)
    with caplog.at_level("WARNING", logger="dco_train.text"), torch.no_grad():
        encode_prompts(tiny.tokenizers, tiny.text_encoders, [long, "a short dog"])
    assert f"The prompt {long!r} is 94 tokens long; only the first 75" in caplog.text and "a short dog" not in caplog.text


def test_a_token_without_a_word_stops_the_base_prompt(tmp_path):
    """A reference learned_embeds file records no words: 'A <dog> playing saxophone' must not
    quietly become 'A playing saxophone'."""
    from dco_train.text import replace_tokens

    with pytest.raises(DCOError, match=r'No word is known for <dog>.*--tokens "<dog>=dog".*word_map'):
        replace_tokens("A <dog> playing saxophone", {"<dog>": ""})
    assert replace_tokens("A <dog> playing saxophone", {"<dog>": ""}, allow_empty=True) == "A playing saxophone"
    assert replace_tokens("A cat", {"<dog>": ""}) == "A cat"  # the token is not in the prompt


def test_a_config_json_token_without_a_word_or_base_prompts_is_refused(tmp_path):
    write_images(tmp_path / "d", ["x"])
    entry = {"images": [str(tmp_path / "d" / "img0.png")], "prompts": ["A <dog> playing saxophone"],
             "inserting_tokens": ["<dog>"], "initializer_tokens": [""]}
    (tmp_path / "config.json").write_text(json.dumps({"mine": entry}), encoding="utf-8")
    with pytest.raises(DCOError, match="No word is known for <dog>"):
        load_dataset_spec(quick_config(config_dir=str(tmp_path / "config.json"), tokens={}, train_text_encoder_ti=True))


# ------------------------------------------------------------------------------- in-memory images
def _tensor(image: Image.Image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def _scene(i: int, size=(80, 64)) -> Image.Image:
    from PIL import ImageDraw

    im = Image.new("RGB", size, (40 * i % 255, 120, 200))
    ImageDraw.Draw(im).ellipse((8 + 4 * i, 8, size[0] // 2 + 8, size[1] - 8), fill=(230, 40, 40))
    return im


def test_images_in_memory_train_like_files(tiny, subject_dir):
    """The same pictures as tensors give the same latents as from their files, named image 1, 2, ..."""
    from dco_train.data import spec_from_images

    cfg = quick_config(data_dir=str(subject_dir))
    from_files = load_dataset_spec(cfg)
    images = [_tensor(open_rgb(s.image)) for s in from_files.samples]
    spec = spec_from_images(images, [s.prompt for s in from_files.samples], quick_config())
    assert [s.name for s in spec.samples] == ["image 1", "image 2", "image 3"]
    assert [s.base_prompt for s in spec.samples] == [s.base_prompt for s in from_files.samples]
    enc = vae_encoder(tiny.vae)
    a, b = encode_dataset(enc, from_files, cfg), encode_dataset(enc, spec, quick_config())
    for x, y in zip(a.items, b.items):
        assert torch.allclose(x.mean, y.mean, atol=1e-6) and torch.equal(x.time_ids, y.time_ids)
    assert b.items[1].name == "image 2" and b.items[1].image_path is None and a.items[1].name == "img1.png"


def test_in_memory_images_of_two_sizes_go_to_two_buckets(tiny):
    from dco_train.data import spec_from_images

    cfg = quick_config(resolution=128, buckets=True)
    images = [_tensor(_scene(0, (256, 128))), _tensor(_scene(1, (128, 128))), _tensor(_scene(2, (256, 128)))]
    spec = spec_from_images(images, ["a <obj> wide", "a <obj> square", "a <obj> wide again"], cfg)
    data = encode_dataset(vae_encoder(tiny.vae), spec, cfg)
    assert sorted(len(g) for g in data.bucket_groups()) == [1, 2]
    wide = data.items[0].mean.shape
    assert wide[2] > wide[1] and data.items[1].mean.shape[1] == data.items[1].mean.shape[2]


def test_in_memory_alpha_and_grey_images_become_rgb():
    from dco_train.data import image_from_tensor

    rgba = torch.zeros(4, 4, 4)  # transparent black -> white
    assert image_from_tensor(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert image_from_tensor(torch.full((4, 4, 1), 0.5)).getpixel((1, 1)) == (128, 128, 128)
    with pytest.raises(DCOError, match=r"\[height, width, channels\]"):
        image_from_tensor(torch.zeros(3, 4, 4, 4))


@pytest.mark.parametrize("images, captions, message", [
    ([], [], "No training images"),
    ([torch.zeros(8, 8, 3)] * 2, ["a <obj>"], "2 images came with 1 captions"),
    ([torch.zeros(8, 8, 3)], ["a toy"], r"caption of image 1 \('a toy'\) does not contain <obj>"),
])
def test_in_memory_bad_inputs_are_sentences(images, captions, message):
    from dco_train.data import spec_from_images

    with pytest.raises(DCOError, match=message):
        spec_from_images(images, captions, quick_config())


# ------------------------------------------------------------------------------- dataset warnings
def _warnings(tiny, images: list[Image.Image], captions: list[str], caplog) -> list[str]:
    from dco_train.data import spec_from_images

    cfg = quick_config()
    spec = spec_from_images([_tensor(im) for im in images], captions, cfg)
    with caplog.at_level("WARNING", logger="dco_train.data"):
        data = encode_dataset(vae_encoder(tiny.vae), spec, cfg)
    assert [r.getMessage() for r in caplog.records if r.getMessage() in data.warnings] == data.warnings
    return data.warnings


DISTINCT = ["a photo of a <obj> on a table", "a <obj> in the snow", "a <obj> on the beach"]


def test_a_good_set_has_no_warnings(tiny, caplog):
    assert _warnings(tiny, [_scene(i) for i in range(3)], DISTINCT, caplog) == []


def test_fewer_than_three_images_are_warned_about(tiny, caplog):
    (warning,) = _warnings(tiny, [_scene(0), _scene(1)], DISTINCT[:2], caplog)
    assert warning.startswith("Only 2 training images")


def test_near_duplicates_are_named_both(tiny, caplog, tmp_path):
    import io

    buf = io.BytesIO()
    _scene(0).save(buf, "JPEG", quality=80)  # a re-compressed, resized copy of image 1
    copy = Image.open(buf).convert("RGB").resize((120, 96))
    (warning,) = _warnings(tiny, [_scene(0), _scene(1), copy, _scene(2)], DISTINCT + ["a <obj> again"], caplog)
    assert warning.startswith("image 1 and image 3 look like near-duplicates")


def test_one_caption_for_every_image_is_warned_about(tiny, caplog):
    (warning,) = _warnings(tiny, [_scene(i) for i in range(3)], ["a photo of a <obj>"] * 3, caplog)
    assert warning.startswith("All 3 captions are the same ('a photo of a <obj>')")


def test_folder_datasets_get_the_warnings_too(tiny, tmp_path):
    write_images(tmp_path / "d", ["a <obj>", "a <obj>"])
    cfg = quick_config(data_dir=str(tmp_path / "d"))
    warnings = encode_dataset(vae_encoder(tiny.vae), load_dataset_spec(cfg), cfg).warnings
    assert [w.split(":")[0] for w in warnings] == ["Only 2 training images", "All 2 captions are the same ('a <obj>')"]
