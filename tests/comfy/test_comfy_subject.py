"""DCO Load Subject on genuine (tiny) ComfyUI objects: one LoRA pick against the hand-wired
LoraLoader + DCO Load Token Embeddings chain, and the files without metadata."""

from __future__ import annotations

import json
import logging

import pytest

import harness

harness.require()

import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py)
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_comfy_trainer import CAPTIONS, graph_models, node_inputs, run_node, write_dataset  # noqa: E402

subject = harness.pack_module("nodes.subject")
emb_nodes = harness.pack_module("nodes.embeddings")
guider_mod = harness.pack_module("nodes.guider")
formats = harness.pack_module("dco_train.formats")
DCOError = harness.pack_module("dco_train.errors").DCOError


def load_subject(model, clip, lora_name, **inputs):
    return harness.call_node(subject.DCOLoadSubject, model=model, clip=clip, lora_name=lora_name,
                             strength=inputs.pop("strength", 1.0), **inputs)


def token_rows(clip, text: str = "a <dog>") -> list[torch.Tensor]:
    return [t for chunk in clip.tokenize(text)["l"] for (t, *_) in chunk if torch.is_tensor(t)]


def patched_keys(model) -> dict[str, int]:
    return {k: len(v) for k, v in model.patches.items() if v}


def word_map(clip) -> dict[str, str]:
    return dict(getattr(clip.tokenizer, emb_nodes.WORD_MAP_ATTR, {}))


def write_subject(folders, name: str = "dog", *, sub: str = "", cfg: float = 6.0, rg: float = 2.5,
                  record_embeddings: bool = True, seed: int = 1) -> formats.TokenEmbeddings:
    """A LoRA + embeddings pair as training writes it (formats.subject_metadata in the LoRA)."""
    g = torch.Generator().manual_seed(seed)
    emb = formats.TokenEmbeddings(tokens=["<dog>"], clip_l=torch.randn(1, harness.HIDDEN_L, generator=g),
                                  clip_g=torch.randn(1, harness.HIDDEN_G, generator=g), initializers=["dog"])
    folder = folders["embeddings"] / sub
    folder.mkdir(parents=True, exist_ok=True)
    emb_path = formats.save_embeddings(folder / f"{name}.safetensors", emb)
    meta = {"dco.tokens": json.dumps(emb.tokens), "dco.initializers": json.dumps(emb.initializers)}
    if record_embeddings:
        meta.update(formats.subject_metadata(emb_path, cfg, rg))
    state = {"unet": harness.peft_unet_lora(harness.build_model(seed=0), 4, seed)}
    formats.save_lora(folders["loras"] / f"{name}.safetensors", state, {"unet": 4.0}, meta, dtype="fp32")
    return emb


# ------------------------------------------------------------------------------- one pick
def test_one_pick_after_training_equals_the_hand_wired_chain(folders):
    """Train with DCO Trainer, then load the subject with one pick: the same MODEL patches as the
    stock LoraLoader, the same token CLIP as LoraLoader -> DCO Load Token Embeddings, the inputs
    passed through, and the preset's scales."""
    model, clip, vae = graph_models()
    data = write_dataset(folders["root"] / "subject", CAPTIONS)
    _, _, lora_name, emb_name, _ = run_node(model, clip, vae, **node_inputs(data, steps=1))
    base_model, model_ft, token_clip, base_clip, cfg, rg = load_subject(model, clip, lora_name)
    assert base_model is model and base_clip is clip
    chain_model, chain_clip = harness.call_node(comfy_nodes.LoraLoader, model=model, clip=clip, lora_name=lora_name,
                                                strength_model=1.0, strength_clip=1.0)
    chain_clip = harness.call_node(emb_nodes.DCOLoadTokenEmbeddings, clip=chain_clip, embeddings=emb_name, tokens="")[0]
    assert patched_keys(model_ft) == patched_keys(chain_model) and len(patched_keys(model_ft)) == 32
    assert word_map(token_clip) == {"<obj>": "toy"}
    ours, chain = harness.encode(token_clip, "a <obj> on a beach"), harness.encode(chain_clip, "a <obj> on a beach")
    assert torch.equal(ours[0][0], chain[0][0]) and torch.equal(ours[0][1]["pooled_output"], chain[0][1]["pooled_output"])
    assert (cfg, rg) == (7.5, 3.0)
    guider = guider_mod.make_guider(base_model, model_ft, ours, harness.encode(base_clip, "a toy on a beach"),
                                    harness.encode(base_clip, ""), cfg, rg)
    assert guider.extra, "model_ft carries the LoRA on top of the base model"


def test_recorded_embeddings_are_found_in_a_subfolder_and_scales_come_out(folders):
    emb = write_subject(folders, sub="pets")
    model, clip = harness.build_model(seed=0), harness.build_clip(seed=0)
    _, model_ft, token_clip, _, cfg, rg = load_subject(model, clip, "dog.safetensors")
    assert (cfg, rg) == (6.0, 2.5)
    assert word_map(token_clip) == {"<dog>": "dog"}
    (row,) = token_rows(token_clip)
    assert torch.equal(row, emb.clip_l[0])
    assert not token_rows(clip), "the input CLIP is not changed"


def test_a_missing_embeddings_file_is_named(folders):
    write_subject(folders)
    (folders["embeddings"] / "dog.safetensors").unlink()
    with pytest.raises(DCOError, match=r"dog\.safetensors was trained with the tokens <dog>, whose embeddings file "
                                       r"dog\.safetensors is not in ComfyUI's embeddings folder"):
        load_subject(harness.build_model(seed=0), harness.build_clip(seed=0), "dog.safetensors")


def test_an_embeddings_file_from_another_run_is_refused_unless_chosen(folders):
    write_subject(folders, seed=1)
    other = formats.TokenEmbeddings(tokens=["<dog>"], clip_l=torch.zeros(1, harness.HIDDEN_L),
                                    clip_g=torch.zeros(1, harness.HIDDEN_G), initializers=["dog"])
    formats.save_embeddings(folders["embeddings"] / "dog.safetensors", other)
    model, clip = harness.build_model(seed=0), harness.build_clip(seed=0)
    with pytest.raises(DCOError, match=r"is not the embeddings file dog\.safetensors was trained with: its sha256 differs"):
        load_subject(model, clip, "dog.safetensors")
    token_clip = load_subject(model, clip, "dog.safetensors", embeddings="dog.safetensors")[2]
    assert torch.equal(token_rows(token_clip)[0], other.clip_l[0])


def test_embeddings_next_to_the_lora_are_found(folders):
    """The command line writes both files into one folder; copied together into loras they still pair."""
    emb = write_subject(folders)
    (folders["embeddings"] / "dog.safetensors").rename(folders["loras"] / "dog.safetensors.tmp")
    lora = folders["loras"] / "dog.safetensors"
    lora.rename(folders["loras"] / "dog_lora.safetensors")
    (folders["loras"] / "dog.safetensors.tmp").rename(folders["loras"] / "dog.safetensors")
    token_clip = load_subject(harness.build_model(seed=0), harness.build_clip(seed=0), "dog_lora.safetensors")[2]
    assert torch.equal(token_rows(token_clip)[0], emb.clip_l[0])


# ------------------------------------------------------------------------------- files without metadata
def test_a_lora_from_before_the_metadata_asks_for_its_embeddings_file(folders):
    emb = write_subject(folders, record_embeddings=False)
    model, clip = harness.build_model(seed=0), harness.build_clip(seed=0)
    with pytest.raises(DCOError, match=r"dog\.safetensors records the tokens <dog> but does not name its embeddings "
                                       r"file .* choose the embeddings file in the embeddings input"):
        load_subject(model, clip, "dog.safetensors")
    _, _, token_clip, _, cfg, rg = load_subject(model, clip, "dog.safetensors", embeddings="dog.safetensors")
    assert word_map(token_clip) == {"<dog>": "dog"} and torch.equal(token_rows(token_clip)[0], emb.clip_l[0])
    assert (cfg, rg) == (7.5, 3.0)


def test_reference_files_load_with_the_tokens_typed_in(folders, caplog):
    """The reference script's pytorch_lora_weights (diffusers keys, which the stock LoraLoader drops
    for SDXL) and learned_embeds (no token metadata): converted in memory, every key applied."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers

    model, clip = harness.build_model(seed=0), harness.build_clip(seed=0)
    unet = convert_state_dict_to_diffusers(harness.peft_unet_lora(model, 4, seed=3))
    save_file({f"unet.{k}": v for k, v in unet.items()}, str(folders["loras"] / "pytorch_lora_weights.safetensors"))
    rows = {"clip_l": torch.randn(1, harness.HIDDEN_L), "clip_g": torch.randn(1, harness.HIDDEN_G)}
    save_file(rows, str(folders["embeddings"] / "learned_embeds.safetensors"))
    pick = dict(lora_name="pytorch_lora_weights.safetensors", embeddings="learned_embeds.safetensors")
    with pytest.raises(DCOError, match=r"learned_embeds\.safetensors does not record its tokens .* type them in the "
                                       "tokens input"):
        load_subject(model, clip, **pick)
    with caplog.at_level(logging.DEBUG):
        _, model_ft, token_clip, _, cfg, rg = load_subject(model, clip, tokens="<dog>=dog", **pick)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert len(patched_keys(model_ft)) == len(harness.diffusers_attention_modules())
    assert word_map(token_clip) == {"<dog>": "dog"} and torch.equal(token_rows(token_clip)[0], rows["clip_l"][0])
    assert (cfg, rg) == (7.5, 3.0)


def test_typed_tokens_rename_the_rows_and_set_the_words(folders):
    emb = write_subject(folders)
    token_clip = load_subject(harness.build_model(seed=0), harness.build_clip(seed=0), "dog.safetensors",
                              tokens="<pup>=puppy")[2]
    assert word_map(token_clip) == {"<pup>": "puppy"}
    assert torch.equal(token_rows(token_clip, "a <pup>")[0], emb.clip_l[0])


def test_a_style_lora_without_tokens_gives_the_lora_clip(folders):
    model, clip = harness.build_model(seed=0), harness.build_clip(seed=0)
    harness.save_engine_lora(folders["loras"] / "style.safetensors", model, rank=4, alpha=4.0, seed=2)
    _, model_ft, token_clip, _, cfg, rg = load_subject(model, clip, "style.safetensors")
    assert len(patched_keys(model_ft)) == 32 and word_map(token_clip) == {} and (cfg, rg) == (7.5, 3.0)
    with pytest.raises(DCOError, match="has tokens typed in but does not name its embeddings file"):
        load_subject(model, clip, "style.safetensors", tokens="<dog>=dog")


# ------------------------------------------------------------------------------- merge, strength
def test_second_lora_merges_subject_and_style_like_two_lora_loaders(folders):
    write_subject(folders)
    model, clip = harness.build_model(seed=0), harness.build_clip(seed=0)
    harness.save_engine_lora(folders["loras"] / "style.safetensors", model, rank=8, alpha=8.0, seed=2)
    _, model_ft, token_clip, _, cfg, rg = load_subject(model, clip, "dog.safetensors", lora_2="style.safetensors",
                                                       strength_2=0.8)
    chain = model
    for name, strength in (("dog.safetensors", 1.0), ("style.safetensors", 0.8)):
        chain, _ = harness.call_node(comfy_nodes.LoraLoader, model=chain, clip=clip, lora_name=name,
                                     strength_model=strength, strength_clip=strength)
    assert patched_keys(model_ft) == patched_keys(chain) and set(patched_keys(model_ft).values()) == {2}
    strengths = sorted({p[0] for patches in model_ft.patches.values() for p in patches})
    assert strengths == [0.8, 1.0]
    assert word_map(token_clip) == {"<dog>": "dog"} and (cfg, rg) == (6.0, 2.5), "the subject's scales"


def test_strength_zero_leaves_the_model_unpatched(folders):
    write_subject(folders)
    model, clip = harness.build_model(seed=0), harness.build_clip(seed=0)
    _, model_ft, token_clip, _, _, _ = load_subject(model, clip, "dog.safetensors", strength=0.0)
    assert model_ft is model and patched_keys(model_ft) == {}
    assert word_map(token_clip) == {"<dog>": "dog"}, "the tokens still load"


def test_an_unknown_lora_is_named(folders):
    with pytest.raises(DCOError, match=r"The LoRA 'gone\.safetensors' \(lora_name\) is not in ComfyUI's loras folder"):
        load_subject(harness.build_model(seed=0), harness.build_clip(seed=0), "gone.safetensors")


def test_fingerprint_changes_when_the_recorded_embeddings_file_changes(folders):
    write_subject(folders)
    before = subject.DCOLoadSubject.fingerprint_inputs(lora_name="dog.safetensors")
    path = folders["embeddings"] / "dog.safetensors"
    path.write_bytes(path.read_bytes() + b" ")
    assert subject.DCOLoadSubject.fingerprint_inputs(lora_name="dog.safetensors") != before


# ------------------------------------------------------------------------------- the page's route
def test_subject_route_answers_what_the_lora_records(folders):
    import asyncio

    from aiohttp.test_utils import make_mocked_request

    routes = harness.pack_module("nodes.routes")
    write_subject(folders)
    save_file({"x.lora_down.weight": torch.zeros(1, 1)}, str(folders["loras"] / "plain.safetensors"))

    def get(query: str):
        response = asyncio.run(routes.lora_subject(make_mocked_request("GET", f"{routes.SUBJECT_ROUTE}{query}")))
        return response.status, json.loads(response.body)

    assert get("?name=dog.safetensors") == (200, {"name": "dog.safetensors", "tokens": ["<dog>"], "words": ["dog"],
                                                  "embeddings": "dog.safetensors", "cfg": 6.0, "rg": 2.5})
    assert get("?name=plain.safetensors")[1]["tokens"] == [] and get("?name=plain.safetensors")[1]["cfg"] is None
    for query, code in (("", 400), ("?name=gone.safetensors", 404), ("?name=../loras/dog.safetensors", 404)):
        status, body = get(query)
        assert status == code and body["error"].endswith("."), (query, body)


def test_schema_is_valid_and_its_ids_distinct_in_this_comfyui(folders):
    """What registration does (v0.3.64 drops the whole pack on a duplicate input/output id)."""
    write_subject(folders)
    schema = subject.DCOLoadSubject.GET_SCHEMA()
    info = subject.DCOLoadSubject.GET_NODE_INFO_V1()
    assert info["output"] == ["MODEL", "MODEL", "CLIP", "CLIP", "FLOAT", "FLOAT"]
    assert "dog.safetensors" in info["input"]["required"]["lora_name"][1]["options"]
    ids = [i.id for i in schema.inputs] + [o.id for o in schema.outputs]
    assert len(ids) == len(set(ids))
