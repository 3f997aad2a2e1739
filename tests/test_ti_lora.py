"""TI rows (fp32, spliced, renormalised), end-of-text pooling, and the LoRA off switch."""

import math

import pytest
import torch

from helpers import quick_config
from dco_train.errors import DCOError
from dco_train.lora import UNET_TARGETS, add_lora, lora_disabled
from dco_train.text import encode_prompts, eos_positions, tokenize
from dco_train.ti import add_tokens
from dco_train.train import RunOptions, train


def _unet_inputs(unet, batch=1):
    g = torch.Generator().manual_seed(3)
    ctx = unet.config.cross_attention_dim
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.tensor([500] * batch),
        encoder_hidden_states=torch.randn(batch, 77, ctx, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(batch, 64, generator=g),
                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)},
    )


def test_lora_off_is_bitwise_the_untouched_unet(tiny):
    inputs = _unet_inputs(tiny.unet)
    with torch.no_grad():
        before = tiny.unet(**inputs).sample
    params = add_lora(tiny.unet, 4, 4.0, UNET_TARGETS, seed=0)
    with torch.no_grad():
        for p in params:  # make the LoRA do something
            p.add_(torch.randn_like(p) * 0.1)
        on = tiny.unet(**inputs).sample
        with lora_disabled(tiny.unet):
            off = tiny.unet(**inputs).sample
    assert torch.equal(off, before)
    assert not torch.allclose(on, before, atol=1e-4)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in tiny.unet.named_parameters() if "lora_" not in n)


def test_a_prompt_with_a_new_token_pools_at_end_of_text(tiny):
    add_tokens(tiny.tokenizers, tiny.text_encoders, {"<dog>": "dog"}).attach()
    tok, enc = tiny.tokenizer_2, tiny.text_encoder_2
    ids = tokenize(tok, ["a photo of a <dog>"])
    new_id = tok.convert_tokens_to_ids("<dog>")
    assert ids[0, 5].item() == new_id and ids[0].argmax().item() == 5  # the legacy rule would pool here
    pos = eos_positions(ids, tok.eos_token_id)
    assert pos.item() == 6 and ids[0, 6].item() == tok.eos_token_id
    with torch.no_grad():
        out = enc(ids, output_hidden_states=True)
        ours = encode_prompts(tiny.tokenizers, tiny.text_encoders, ["a photo of a <dog>"]).pooled
    at_eos = enc.text_projection(out.last_hidden_state[0, 6])
    at_token = enc.text_projection(out.last_hidden_state[0, 5])
    assert torch.allclose(ours[0], at_eos, atol=1e-6)
    assert not torch.allclose(ours[0], at_token, atol=1e-3)
    assert torch.allclose(out.text_embeds[0], at_eos, atol=1e-6)  # transformers agrees after fix_eos_pooling


def test_token_prompt_encodes_like_the_base_prompt_at_initialisation(tiny):
    add_tokens(tiny.tokenizers, tiny.text_encoders, {"<dog>": "dog"}).attach()
    with torch.no_grad():
        tok = encode_prompts(tiny.tokenizers, tiny.text_encoders, ["a photo of a <dog> on the beach"])
        base = encode_prompts(tiny.tokenizers, tiny.text_encoders, ["a photo of a dog on the beach"])
    assert torch.equal(tok.embeds, base.embeds) and torch.equal(tok.pooled, base.pooled)


def test_first_dco_loss_is_exactly_ln2_with_ti(tiny, subject_dir, tmp_path):
    res = train(quick_config(data_dir=str(subject_dir), max_train_steps=1), tiny,
                RunOptions(output_dir=tmp_path / "out", progress_bar=False, log_with=None))
    first = res.history[0]
    assert first["err_model"] == first["err_ref"]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_ti_rows_train_in_fp32_under_bf16_and_nothing_else_moves(tiny, subject_dir, tmp_path):
    """bf16 on the CPU (accelerate autocasts there too): the UNet computes in bf16, the TI rows stay
    fp32 and move, the frozen tables do not. The frozen weights are held in bf16 (`weight_dtype`), so
    the rows start from, and keep the norm of, the word's row as rounded to bf16."""
    from dco_train.train import weight_dtype

    frozen = weight_dtype("bf16", torch.device("cpu"))
    tables = [e.get_input_embeddings().weight.detach().to(frozen).float() for e in tiny.text_encoders]
    computed: list[torch.dtype] = []
    hook = tiny.unet.conv_in.register_forward_hook(lambda m, i, o: computed.append(o.dtype))
    cfg = quick_config(data_dir=str(subject_dir), max_train_steps=5, mixed_precision="bf16", text_encoder_lr=1e-2)
    res = train(cfg, tiny, RunOptions(output_dir=tmp_path / "out", progress_bar=False, log_with=None, cpu=True))
    hook.remove()
    assert computed and all(d == torch.bfloat16 for d in computed), "the step did not run in bf16"
    assert frozen == torch.bfloat16
    assert tiny.unet.conv_in.weight.dtype == frozen and tiny.text_encoder_2.get_input_embeddings().weight.dtype == frozen
    ts = res.token_set
    for rows, table, word_id in zip(ts.rows, tables, [t.convert_tokens_to_ids("toy</w>") for t in tiny.tokenizers]):
        assert rows.rows.dtype == torch.float32
        moved = (rows.rows.detach()[0] - table[word_id]).abs().max().item()
        assert moved > 1e-4, "the TI row did not move"
        assert torch.allclose(rows.rows.detach().norm(dim=-1), table[word_id].norm()[None], rtol=1e-5)
    for enc, table in zip(tiny.text_encoders, tables):
        assert torch.equal(enc.get_input_embeddings().weight.float(), table)


def test_a_token_that_is_already_a_word_is_refused(tiny):
    with pytest.raises(DCOError, match="already in the tokenizer's vocabulary"):
        add_tokens(tiny.tokenizers, tiny.text_encoders, {"dog</w>": "dog"})
    with pytest.raises(DCOError, match="already in the tokenizer's vocabulary"):
        add_tokens(tiny.tokenizers, tiny.text_encoders, {"<|endoftext|>": "dog"})


@pytest.mark.parametrize("token", ["dog", "Dog", "saxophone"])
def test_a_whole_word_is_refused_as_a_new_token(tiny, token):
    """CLIP stores whole words with `</w>` (`dog</w>`); the plain word is just as taken."""
    with pytest.raises(DCOError, match=f"The token {token} is already in the tokenizer's vocabulary"):
        add_tokens(tiny.tokenizers, tiny.text_encoders, {token: "toy"})


def test_a_new_string_is_still_accepted(tiny):
    assert add_tokens(tiny.tokenizers, tiny.text_encoders, {"<dog>": "dog", "sksx": "dog"}).tokens == ["<dog>", "sksx"]


def test_random_initialiser_uses_the_table_spread(tiny):
    ts = add_tokens(tiny.tokenizers, tiny.text_encoders, {"<x>": ""}, seed=1)
    table = tiny.text_encoder.get_input_embeddings().weight
    ratio = ts.rows[0].rows.std().item() / table.std().item()
    assert 0.5 < ratio < 2.0


def test_fast_switch_matches_peft_enable_adapters(tiny):
    from dco_train.lora import set_lora_enabled

    params = add_lora(tiny.unet, 4, 4.0, UNET_TARGETS, seed=0)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
    inputs = _unet_inputs(tiny.unet)
    layers = [m for m in tiny.unet.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]
    with torch.no_grad():
        set_lora_enabled(tiny.unet, False)
        ours_off = tiny.unet(**inputs).sample
        set_lora_enabled(tiny.unet, True)
        ours_on = tiny.unet(**inputs).sample
        for layer in layers:
            layer.enable_adapters(False)
        peft_off = tiny.unet(**inputs).sample
        for layer in layers:
            layer.enable_adapters(True)
        peft_on = tiny.unet(**inputs).sample
    assert torch.equal(ours_off, peft_off) and torch.equal(ours_on, peft_on)
    assert not torch.equal(ours_on, ours_off)
    assert all(p.requires_grad for p in params)  # the switch leaves the trainable flags alone
