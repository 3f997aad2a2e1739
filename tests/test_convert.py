"""Reference (diffusers-format) LoRAs: read by our loader and rewritten as kohya files by `convert`."""

import pytest
import torch
from safetensors import safe_open

from dco_train.cli import main
from dco_train.convert import convert_lora
from dco_train.errors import DCOError
from dco_train.formats import load_lora, peft_to_kohya
from dco_train.lora import TEXT_TARGETS, UNET_TARGETS, add_lora, lora_state_dict


@pytest.fixture
def reference_lora(tiny, tmp_path):
    """What the reference script saves: `save_lora_weights` of `convert_state_dict_to_diffusers`
    of peft's state dicts (unet.<module>.lora.down.weight, text_encoder.<...>.lora_linear_layer)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    peft = {}
    for name, model, targets in (("unet", tiny.unet, UNET_TARGETS), ("text_encoder", tiny.text_encoder, TEXT_TARGETS)):
        for p in add_lora(model, 4, 4.0, targets, seed=1):
            with torch.no_grad():
                p.copy_(torch.randn_like(p))
        peft[name] = lora_state_dict(model)
    folder = tmp_path / "reference_out"
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(peft["unet"]),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(peft["text_encoder"]), safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors", peft


def _tensors(path):
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()


def test_the_fixture_is_in_the_reference_format(reference_lora):
    keys = list(_tensors(reference_lora[0])[0])
    assert any(k.startswith("unet.") and k.endswith(".lora.down.weight") for k in keys)
    assert not any(k.endswith(".lora_down.weight") for k in keys)


def test_convert_writes_our_own_kohya_keys_with_explicit_alpha(reference_lora, tmp_path):
    """The converted file equals what our trainer writes for the same weights (alpha = rank), the
    layout ComfyUI maps with zero dropped keys (tests/comfy/test_comfy_lora_file.py)."""
    src, peft = reference_lora
    summary = convert_lora(src, tmp_path / "dog.safetensors")
    got, meta = _tensors(tmp_path / "dog.safetensors")
    want = peft_to_kohya(peft, {"unet": 4.0, "text_encoder": 4.0})
    assert set(got) == set(want) and summary["modules"] == sum(k.endswith(".alpha") for k in want)
    for key, value in want.items():
        assert torch.equal(got[key].float(), value.float()), key
    assert all(float(got[k]) == 4.0 for k in got if k.endswith(".alpha"))
    assert meta["ss_network_dim"] == "4" and meta["dco.converted_from"] == "pytorch_lora_weights.safetensors"


def test_our_loader_reads_a_reference_lora_as_it_is(reference_lora):
    src, peft = reference_lora
    lora = load_lora(src)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    module = lora.modules["unet"][name]
    assert torch.equal(module.down, peft["unet"]["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"])
    assert module.alpha == 4.0 and module.scale == 1.0
    assert set(lora.modules) == {"unet", "text_encoder"}


def test_a_peft_format_file_converts_too(tiny, tmp_path):
    from safetensors.torch import save_file

    add_lora(tiny.unet, 2, 2.0, UNET_TARGETS, seed=0)
    sd = {f"unet.{k}": v.contiguous() for k, v in lora_state_dict(tiny.unet).items()}
    save_file(sd, str(tmp_path / "peft.safetensors"))
    convert_lora(tmp_path / "peft.safetensors", tmp_path / "out.safetensors")
    assert set(_tensors(tmp_path / "out.safetensors")[0]) == set(peft_to_kohya({"unet": lora_state_dict(tiny.unet)}, {"unet": 2.0}))


def test_convert_command_line_and_its_refusals(reference_lora, tmp_path, capsys):
    src, _ = reference_lora
    out = tmp_path / "dog.safetensors"
    assert main(["convert", str(src.parent), str(out)]) == 0  # the reference's output folder works too
    assert '"modules"' in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["convert", str(src), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == before
    with pytest.raises(DCOError, match="already a kohya-format LoRA"):
        convert_lora(out, tmp_path / "again.safetensors")
    assert not (tmp_path / "again.safetensors").exists()


def test_the_sampler_takes_a_reference_lora(reference_lora, tokenizer_dir):
    """Our sampler's adapter loader used to refuse the reference's file; now it applies it, with the
    same effect as the converted kohya file."""
    from dco_train.sample import load_adapters
    from dco_train.tiny import build_tiny_sdxl

    src, _ = reference_lora
    g = torch.Generator().manual_seed(0)
    x, c, p = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 128, generator=g), torch.randn(1, 64, generator=g)
    kw = dict(added_cond_kwargs={"text_embeds": p, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
    outs = []
    for lora in (None, src):
        comps = build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir)
        if lora is not None:
            load_adapters(comps, [(lora, 1.0)])
        with torch.no_grad():
            outs.append(comps.unet(x, torch.tensor([500]), c, **kw).sample)
    assert (outs[0] - outs[1]).abs().max() > 1e-3
