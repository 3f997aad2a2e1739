"""DCO Load Token Embeddings and DCO Prompt Pair on a genuine (tiny) ComfyUI SDXL CLIP."""

from __future__ import annotations

import pytest

import harness

harness.require()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

emb_nodes = harness.pack_module("nodes.embeddings")
formats = harness.pack_module("dco_train.formats")
DCOError = harness.pack_module("dco_train.errors").DCOError

TEXT = "a photo of <dog> on a beach"


def _rows(seed: int, n: int, width: int = harness.HIDDEN_L) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip():
    return harness.build_clip(seed=0)


@pytest.fixture()
def emb_dir(tmp_path):
    """An embeddings folder ComfyUI knows, holding an engine-format file with two tokens."""
    emb = formats.TokenEmbeddings(tokens=["<dog>", "<cat>"], clip_l=_rows(1, 2), clip_g=_rows(2, 2, harness.HIDDEN_G),
                                  initializers=["dog", "cat"])
    formats.save_embeddings(tmp_path / "pets.safetensors", emb)
    with harness.model_folder("embeddings", tmp_path):
        yield tmp_path, emb


def load(clip, name: str, tokens: str = ""):
    return harness.call_node(emb_nodes.DCOLoadTokenEmbeddings, clip=clip, embeddings=name, tokens=tokens)[0]


def tensor_entries(tokens: dict, key: str) -> list[tuple[torch.Tensor, float]]:
    return [(t, w) for chunk in tokens[key] for (t, w, *_) in chunk if torch.is_tensor(t)]


def test_tokens_become_the_file_rows_in_both_encoders(clip, emb_dir):
    _, emb = emb_dir
    token_clip = load(clip, "pets.safetensors")
    tokens = token_clip.tokenize("a <cat> and a <dog>, (<dog>:1.2)")
    for key, rows in (("l", emb.clip_l), ("g", emb.clip_g)):
        entries = tensor_entries(tokens, key)
        assert len(entries) == 3, f"{key}: every token occurrence must be one embedding row"
        assert torch.equal(entries[0][0], rows[1]) and entries[0][1] == 1.0  # <cat>
        assert torch.equal(entries[1][0], rows[0]) and entries[1][1] == 1.0  # <dog>
        assert torch.equal(entries[2][0], rows[0]) and entries[2][1] == pytest.approx(1.2)  # (<dog>:1.2)


def test_rows_reach_each_encoder_separately(clip, tmp_path):
    """Changing only the clip_l rows changes only the CLIP-L half of the conditioning, and the
    clip_g rows only the CLIP-G half and the pooled output: both encoders read their own rows."""
    l0, g0 = _rows(3, 1), _rows(4, 1, harness.HIDDEN_G)
    bump_l, bump_g = _rows(9, 1), _rows(10, 1, harness.HIDDEN_G)  # random, not constant: LayerNorm would cancel a constant shift
    variants = {"base": (l0, g0), "l": (l0 + bump_l, g0), "g": (l0, g0 + bump_g)}
    conds = {}
    with harness.model_folder("embeddings", tmp_path):
        for name, (rows_l, rows_g) in variants.items():
            formats.save_embeddings(tmp_path / f"{name}.safetensors",
                                    formats.TokenEmbeddings(tokens=["<dog>"], clip_l=rows_l, clip_g=rows_g, initializers=["dog"]))
            c = harness.encode(load(clip, f"{name}.safetensors"), TEXT)
            conds[name] = (c[0][0], c[0][1]["pooled_output"])
    (cb, pb), (cl, pl), (cg, pg) = conds["base"], conds["l"], conds["g"]
    width_l = harness.HIDDEN_L
    assert (cl[..., :width_l] - cb[..., :width_l]).abs().max() > 1e-3
    assert torch.equal(cl[..., width_l:], cb[..., width_l:]) and torch.equal(pl, pb)
    assert torch.equal(cg[..., :width_l], cb[..., :width_l])
    assert (cg[..., width_l:] - cb[..., width_l:]).abs().max() > 1e-3 and (pg - pb).abs().max() > 1e-3


def test_same_conditioning_as_comfyui_embedding_syntax(clip, emb_dir):
    """`<dog>` through our CLIP equals `embedding:dogrow` through a stock CLIP reading a file with
    the same row from disk: the rows go through ComfyUI's own embedding path (tolerance 0)."""
    folder, emb = emb_dir
    save_file({"clip_l": emb.clip_l[:1].contiguous(), "clip_g": emb.clip_g[:1].contiguous()}, str(folder / "dogrow.safetensors"))
    stock = harness.build_clip(seed=0, embedding_directory=[str(folder)])
    ours = harness.encode(load(clip, "pets.safetensors"), TEXT)
    ref = harness.encode(stock, "a photo of embedding:dogrow on a beach")
    plain = harness.encode(clip, "a photo of dog on a beach")
    assert torch.equal(ours[0][0], ref[0][0])
    assert torch.equal(ours[0][1]["pooled_output"], ref[0][1]["pooled_output"])
    assert (ours[0][0] - plain[0][0]).abs().max() > 1e-3


def test_input_clip_is_untouched(clip, emb_dir):
    tokenizer, sub_l, sub_g = clip.tokenizer, clip.tokenizer.clip_l, clip.tokenizer.clip_g
    before = harness.encode(clip, TEXT)
    token_clip = load(clip, "pets.safetensors")
    assert token_clip is not clip and token_clip.tokenizer is not tokenizer
    assert clip.tokenizer is tokenizer and clip.tokenizer.clip_l is sub_l and clip.tokenizer.clip_g is sub_g
    assert not hasattr(tokenizer, emb_nodes.WORD_MAP_ATTR)
    for sub in (sub_l, sub_g):  # the original sub-tokenizers got no rows and no lookup override
        assert not hasattr(sub, emb_nodes.ROWS_ATTR) and "_try_get_embedding" not in vars(sub)
    assert "tokenize_with_weights" not in vars(tokenizer)
    assert tensor_entries(clip.tokenize(TEXT), "l") == [] and tensor_entries(clip.tokenize(TEXT), "g") == []
    assert torch.equal(harness.encode(clip, TEXT)[0][0], before[0][0])


def test_loaders_stack_and_survive_stock_clip_nodes(clip, emb_dir, tmp_path):
    import comfy.hooks
    from comfy_extras.nodes_hooks import SetClipHooks

    folder, emb = emb_dir
    formats.save_embeddings(folder / "fox.safetensors", formats.TokenEmbeddings(
        tokens=["<fox>"], clip_l=_rows(7, 1), clip_g=_rows(8, 1, harness.HIDDEN_G), initializers=["fox"]))
    both = load(load(clip, "pets.safetensors"), "fox.safetensors")
    hooked = harness.call_node(SetClipHooks, clip=both, apply_to_conds=True, schedule_clip=False,
                               hooks=comfy.hooks.HookGroup())[0]
    for c in (both, hooked, both.clone()):
        entries = tensor_entries(c.tokenize("<fox> chases <dog>"), "g")
        assert len(entries) == 2
        assert torch.equal(entries[0][0], _rows(8, 1, harness.HIDDEN_G)[0]) and torch.equal(entries[1][0], emb.clip_g[0])
    assert getattr(both.tokenizer, emb_nodes.WORD_MAP_ATTR) == {"<dog>": "dog", "<cat>": "cat", "<fox>": "fox"}


def test_width_mismatch_is_refused_with_the_file_name(clip, tmp_path):
    formats.save_embeddings(tmp_path / "sd15.safetensors", formats.TokenEmbeddings(
        tokens=["<dog>"], clip_l=_rows(1, 1, 768), clip_g=_rows(1, 1, 1280)))
    with harness.model_folder("embeddings", tmp_path), pytest.raises(DCOError, match=r"sd15\.safetensors.*768 wide.*32 wide"):
        load(clip, "sd15.safetensors")


def test_more_tokens_than_rows_is_refused_with_the_file_name(clip, emb_dir):
    with pytest.raises(DCOError, match=r"pets\.safetensors.*2 clip_l row\(s\) but 3 token"):
        load(clip, "pets.safetensors", tokens="<a>, <b>, <c>")


def test_reference_file_without_metadata_needs_typed_tokens(clip, tmp_path):
    """A reference `learned_embeds.safetensors` (tensors only) loads once the tokens are typed in."""
    save_file({"clip_l": _rows(5, 1), "clip_g": _rows(6, 1, harness.HIDDEN_G)}, str(tmp_path / "learned_embeds.safetensors"))
    with harness.model_folder("embeddings", tmp_path):
        with pytest.raises(DCOError, match="does not record its tokens"):
            load(clip, "learned_embeds.safetensors")
        token_clip = load(clip, "learned_embeds.safetensors", tokens="<sks>")
        assert torch.equal(tensor_entries(token_clip.tokenize("a <sks> dog"), "l")[0][0], _rows(5, 1)[0])
        pair = emb_nodes.DCOPromptPair
        with pytest.raises(DCOError, match="No plain word is known for <sks>"):
            harness.call_node(pair, token_clip=token_clip, base_clip=clip, text="a <sks> dog")
        token, base = harness.call_node(pair, token_clip=token_clip, base_clip=clip, text="a <sks> dog", word_map="<sks>=")
        assert torch.equal(base[0][0], harness.encode(clip, "a dog")[0][0])


def test_prompt_pair_writes_the_base_prompt(clip, emb_dir):
    token_clip = load(clip, "pets.safetensors")
    pair = emb_nodes.DCOPromptPair
    token, base = harness.call_node(pair, token_clip=token_clip, base_clip=clip, text="<dog> and <cat>, (<dog>:1.2)")
    assert torch.equal(token[0][0], harness.encode(token_clip, "<dog> and <cat>, (<dog>:1.2)")[0][0])
    assert torch.equal(base[0][0], harness.encode(clip, "dog and cat, (dog:1.2)")[0][0])
    assert torch.equal(base[0][1]["pooled_output"], harness.encode(clip, "dog and cat, (dog:1.2)")[0][1]["pooled_output"])
    _, mapped = harness.call_node(pair, token_clip=token_clip, base_clip=clip, text="a <dog>", word_map="<dog>=puppy")
    assert torch.equal(mapped[0][0], harness.encode(clip, "a puppy")[0][0])
    with pytest.raises(DCOError, match="names <fox>, which the token CLIP does not know"):
        harness.call_node(pair, token_clip=token_clip, base_clip=clip, text="a <fox>")
    with pytest.raises(DCOError, match="not of the form"):
        harness.call_node(pair, token_clip=token_clip, base_clip=clip, text="a <dog>", word_map="dog")


@pytest.mark.parametrize("text, tokens, expected", [
    ("a <dog> on a beach", ["<dog>"], "a  embedding:<dog>  on a beach"),
    ("(<dog>:1.2)", ["<dog>"], "( embedding:<dog> :1.2)"),
    ("sks, asks", ["sks"], " embedding:sks , asks"),  # word tokens only match whole words
    ("embedding:<dog>", ["<dog>"], "embedding:<dog>"),  # already ComfyUI syntax: left alone
    ("<dog><dog2>", ["<dog>", "<dog2>"], " embedding:<dog>  embedding:<dog2> "),  # longest first
])
def test_rewrite_tokens(text, tokens, expected):
    assert emb_nodes.rewrite_tokens(text, tokens) == expected


def test_bad_token_names_are_refused():
    with pytest.raises(DCOError, match="one word"):
        emb_nodes.check_tokens(["<my dog>"])
