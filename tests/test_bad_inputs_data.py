"""Bad inputs to the data, token, model and file layers, table-driven.

Each case builds its bad input in a fresh folder and calls the engine function a user's input
reaches. Every case asserts: a DCOError (never a traceback), a message that names the file or
field and says how to fix it, nothing new left in the output folder, and a bounded time.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import quick_config, write_images
from dco_train.errors import DCOError

Case = Callable[[Path, Path], Callable[[], object]]  # (tmp, out) -> the call that must fail


def _latin1_caption(tmp, out):
    from dco_train.data import load_dataset_spec

    write_images(tmp / "d", ["x"])
    (tmp / "d" / "img0.txt").write_bytes("un café <obj>".encode("latin-1"))
    return lambda: load_dataset_spec(quick_config(data_dir=str(tmp / "d")))


def _decompression_bomb(tmp, out):
    from dco_train.data import open_rgb

    write_images(tmp / "d", ["a <obj>"], size=(80, 64))
    old = Image.MAX_IMAGE_PIXELS

    def call():
        Image.MAX_IMAGE_PIXELS = 1000  # Pillow's own safety limit, lowered so a small file trips it
        try:
            return open_rgb(tmp / "d" / "img0.png")
        finally:
            Image.MAX_IMAGE_PIXELS = old

    return call


def _token_without_word(tmp, out):
    from dco_train.config import TrainConfig, parse_tokens

    return lambda: TrainConfig.subject(data_dir=str(tmp), tokens=parse_tokens("<dog>"))


def _token_is_its_word(tmp, out):
    from dco_train.config import parse_tokens

    return lambda: parse_tokens("dog=dog")


def _duplicate_token(tmp, out):
    from dco_train.config import parse_tokens

    return lambda: parse_tokens("<a>=dog, <a>=cat")


def _tokens_with_the_style_preset(tmp, out):
    from dco_train.config import TrainConfig

    return lambda: TrainConfig.style(data_dir=str(tmp), tokens={"<dog>": "dog"})


def _tokens_not_text(tmp, out):
    from dco_train.config import parse_tokens

    return lambda: parse_tokens(["<dog>=dog"])


def _config_json_token_without_word(tmp, out):
    from dco_train.data import load_dataset_spec

    write_images(tmp / "d", ["x"])
    entry = {"images": [str(tmp / "d" / "img0.png")], "prompts": ["A <dog> playing saxophone"],
             "inserting_tokens": ["<dog>"], "initializer_tokens": [""]}
    (tmp / "config.json").write_text(json.dumps({"mine": entry}), encoding="utf-8")
    return lambda: load_dataset_spec(quick_config(config_dir=str(tmp / "config.json"), tokens={}, train_text_encoder_ti=True))


def _reference_embeddings_without_words(tmp, out):
    from dco_train.formats import load_embeddings
    from dco_train.text import replace_tokens

    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 96)}, str(tmp / "learned_embeds.safetensors"))
    emb = load_embeddings(tmp / "learned_embeds.safetensors", tokens=["<dog>"])
    return lambda: replace_tokens("A <dog> playing saxophone", emb.word_map)


def _lora_for_another_model(tmp, out):
    from dco_train.formats import LoraModule, check_lora_shapes

    layer = torch.nn.Linear(64, 64)
    wrong = LoraModule(down=torch.zeros(4, 80), up=torch.zeros(80, 4), alpha=4.0)
    return lambda: check_lora_shapes("other.safetensors", "unet", {"down_blocks.1.attn1.to_q": (wrong, layer)})


def _lora_down_up_mismatch(tmp, out):
    from dco_train.formats import load_lora

    save_file({"lora_unet_x_to_q.lora_down.weight": torch.zeros(4, 64), "lora_unet_x_to_q.lora_up.weight": torch.zeros(64, 8)},
              str(tmp / "broken.safetensors"))
    return lambda: load_lora(tmp / "broken.safetensors")


def _resume_lora_of_another_rank(tmp, out):
    from dco_train.lora import UNET_TARGETS, add_lora, load_lora_state_dict, lora_state_dict
    from dco_train.tiny import UNET_CONFIG
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**UNET_CONFIG)
    add_lora(unet, 4, 4.0, UNET_TARGETS)
    state = {k: torch.zeros(8, *v.shape[1:]) if "lora_A" in k else v for k, v in lora_state_dict(unet).items()}
    return lambda: load_lora_state_dict(unet, state)


def _full_disk(tmp, out):
    from dco_train.formats import atomic_write

    def fails(path):
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return lambda: atomic_write(out / "lora.safetensors", fails)


def _read_only_output(tmp, out):
    from dco_train.formats import atomic_write

    def fails(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    return lambda: atomic_write(out / "embeddings.safetensors", fails)


def _truncated_state_json(tmp, out):
    from dco_train.checkpoint import load_checkpoint

    folder = tmp / "checkpoint-3"
    folder.mkdir()
    (folder / "state.json").write_text('{"step": 3, "optim', encoding="utf-8")
    return lambda: load_checkpoint(folder)


def _hub_id_offline(tmp, out):
    from dco_train.models import load_sdxl

    os.environ["HF_HUB_OFFLINE"] = "1"  # conftest sets it for the session too
    return lambda: load_sdxl("nobody-here/not-a-model-xyz")


def _relative_path_typo(tmp, out):
    from dco_train.models import load_sdxl

    return lambda: load_sdxl(str(tmp / "modles" / "sdxl"))


def _relative_file_typo(tmp, out):
    from dco_train.models import load_sdxl

    return lambda: load_sdxl("sd_xl_bsae_1.0.safetensors")


def _sd15_folder(tmp, out):
    from diffusers import UNet2DConditionModel

    from dco_train.models import load_sdxl

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    unet.save_pretrained(tmp / "sd15" / "unet")
    (tmp / "sd15" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return lambda: load_sdxl(tmp / "sd15")


def _sd15_unet_without_index(tmp, out):
    from dco_train.models import load_sdxl

    (tmp / "m" / "unet").mkdir(parents=True)
    (tmp / "m" / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 768}))
    return lambda: load_sdxl(tmp / "m")


def _bin_only_folder(tmp, out):
    from dco_train.models import load_sdxl
    from dco_train.tiny import UNET_CONFIG

    (tmp / "m" / "unet").mkdir(parents=True)
    (tmp / "m" / "unet" / "config.json").write_text(json.dumps({**UNET_CONFIG, "_class_name": "UNet2DConditionModel"}))
    (tmp / "m" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    return lambda: load_sdxl(tmp / "m")


def _convert_not_a_lora(tmp, out):
    from dco_train.convert import convert_lora

    save_file({"clip_l": torch.zeros(1, 4)}, str(tmp / "embeds.safetensors"))
    return lambda: convert_lora(tmp / "embeds.safetensors", out / "x.safetensors")


def _convert_missing_input(tmp, out):
    from dco_train.convert import convert_lora

    return lambda: convert_lora(tmp / "pytorch_lora_weigths.safetensors", out / "x.safetensors")


def _convert_unknown_component(tmp, out):
    from dco_train.convert import convert_lora

    save_file({"unet.a.lora.down.weight": torch.zeros(2, 4), "transformer.b.lora.down.weight": torch.zeros(2, 4)},
              str(tmp / "flux.safetensors"))
    return lambda: convert_lora(tmp / "flux.safetensors", out / "x.safetensors")


CASES: list[tuple[Case, str]] = [
    (_latin1_caption, r"img0\.txt is not UTF-8 text.*save it as UTF-8"),
    (_decompression_bomb, r"img0\.png is too large to open safely.*Resize it"),
    (_token_without_word, r'token <dog> has no word.*--tokens "<dog>=dog"'),
    (_token_is_its_word, r"token dog is the same as its word.*e\.g\. <dog>=dog"),
    (_duplicate_token, r"token <a> is listed twice in tokens.*give each token once"),
    (_tokens_with_the_style_preset, r"tokens \(<dog>\) are given but textual inversion is off \(the style preset.*--train_text_encoder_ti"),
    (_tokens_not_text, r"tokens must be text such as <dog>=dog"),
    (_config_json_token_without_word, r'No word is known for <dog>.*--tokens "<dog>=dog"'),
    (_reference_embeddings_without_words, r'No word is known for <dog>.*--tokens "<dog>=dog".*word_map'),
    (_lora_for_another_model, r"other\.safetensors: the unet LoRA for down_blocks\.1\.attn1\.to_q is 80 -> 80 wide.*64 -> 64.*trained on this base model"),
    (_lora_down_up_mismatch, r"broken\.safetensors: lora_unet_x_to_q has lora_down \(4, 64\) and lora_up \(64, 8\)"),
    (_resume_lora_of_another_rank, r"LoRA tensor .*lora_A\.weight is \(8, .*Resume with the same model and rank"),
    (_full_disk, r"Cannot write .*lora\.safetensors: the disk is full; free some space"),
    (_read_only_output, r"Cannot write .*embeddings\.safetensors: the file system is read-only; choose a writable"),
    (_truncated_state_json, r"checkpoint-3.state\.json is damaged or incomplete.*earlier checkpoint"),
    (_hub_id_offline, r"nobody-here/not-a-model-xyz is not in the local Hugging Face cache and HF_HUB_OFFLINE is set \(no network\)"),
    (_relative_path_typo, r"local path .*modles.sdxl was not found.*check the spelling"),
    (_relative_file_typo, r"local path sd_xl_bsae_1\.0\.safetensors was not found"),
    (_sd15_folder, r"sd15 is a StableDiffusionPipeline folder \(model_index\.json\), not an SDXL"),
    (_sd15_unet_without_index, r"UNet without SDXL's text_time conditioning.*SD 1\.x/2\.x"),
    (_bin_only_folder, r"unet holds only pickled \.bin weights; only \.safetensors are loaded.*Convert"),
    (_convert_not_a_lora, r"embeds\.safetensors holds no diffusers-format LoRA keys"),
    (_convert_missing_input, r"pytorch_lora_weigths\.safetensors does not exist; check the path"),
    (_convert_unknown_component, r"flux\.safetensors: the key transformer\.b\.lora\.down\.weight is not for an SDXL"),
]


@pytest.mark.parametrize("make,message", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_bad_input_is_a_sentence_not_a_traceback(tmp_path, make, message):
    out = tmp_path / "out"
    out.mkdir()
    call = make(tmp_path, out)
    start = time.monotonic()
    with pytest.raises(DCOError, match=message) as info:
        call()
    assert time.monotonic() - start < 20, "a bad input must fail fast"
    text = str(info.value)
    assert text.rstrip().endswith((".", ")")) and len(text.split()) >= 8, "a full sentence that says how to fix it"
    assert list(out.iterdir()) == [], "a failed call left files in the output folder"


def test_the_table_covers_at_least_fifteen_cases():
    assert len(CASES) >= 15
