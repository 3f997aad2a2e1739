"""Bad input to the nodes, table-driven: the trainer (through ComfyUI's own prompt validation and
through its execute), the token loader, the prompt pair and the reward-guidance guider.

Every case asserts the same four things: a node error (a validation message or a DCOError) whose
text names the field or file and says what to do; no traceback text in it; nothing written to
the loras / embeddings / output folders (all temporary here); and a bounded time.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import re
import sys
import time
from pathlib import Path

import pytest

import harness

harness.require()

import torch  # noqa: E402
from test_comfy_trainer import CAPTIONS, folders, graph_models, node_inputs, run_node, write_dataset  # noqa: E402,F401

trainer = harness.pack_module("nodes.trainer")
emb_nodes = harness.pack_module("nodes.embeddings")
guider_mod = harness.pack_module("nodes.guider")
formats = harness.pack_module("dco_train.formats")
DCOError = harness.pack_module("dco_train.errors").DCOError

SECONDS = 30.0  # each case must answer well inside this (validation cases inside 5 s)
VALIDATED = ("dataset_dir", "preset", "tokens", "output_name", "overwrite", "resume")  # validate_inputs' arguments


def assert_clean_message(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text, text
    assert len(text) > 30, text


def assert_nothing_written(folders) -> None:
    written = [p for kind in ("loras", "embeddings", "output") for p in folders[kind].rglob("*")
               if p.is_file() and p.name != "keep.safetensors" and "keep" not in p.parts]
    assert not written, written


# ------------------------------------------------------------------------ ComfyUI's own validation
def _fixture_loader():
    name = "dco_bad_inputs_fixture"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "fixture_pack" / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].DCOTestTinySDXL


def comfy_execution():
    """ComfyUI's execution module, bound to ComfyUI's nodes.py. pytest puts the repository root on
    sys.path ahead of ComfyUI, where the pack's own `nodes/` package shadows that name."""
    for name in ("nodes", "execution"):
        module = sys.modules.get(name)
        if module is not None and not str(getattr(module, "__file__", "")).startswith(str(harness.comfy_path())):
            del sys.modules[name]
    sys.path.insert(0, str(harness.comfy_path()))
    try:
        import execution
    finally:
        sys.path.remove(str(harness.comfy_path()))
    assert hasattr(execution.nodes, "NODE_CLASS_MAPPINGS")
    return execution


def comfy_validate(inputs: dict) -> list[dict]:
    """The errors ComfyUI's validate_prompt reports for a DCOTrainer fed by the tiny loader."""
    execution = comfy_execution()
    nodes = execution.nodes

    prompt = {"1": {"class_type": "DCOTestTinySDXL", "inputs": {"seed": 0}},
              "2": {"class_type": "DCOTrainer", "inputs": {**inputs, "model": ["1", 0], "clip": ["1", 1],
                                                           "vae": ["1", 2]}}}
    saved = dict(nodes.NODE_CLASS_MAPPINGS)
    nodes.NODE_CLASS_MAPPINGS.update(DCOTrainer=trainer.DCOTrainer, DCOTestTinySDXL=_fixture_loader())
    try:
        valid, _, _, node_errors = asyncio.run(execution.validate_prompt("bad-inputs", prompt, None))
    finally:
        nodes.NODE_CLASS_MAPPINGS.clear()
        nodes.NODE_CLASS_MAPPINGS.update(saved)
    errors = node_errors.get("2", {}).get("errors", [])
    assert valid is False or not errors
    return errors


def _exists(f, data):
    (f["loras"] / "keep.safetensors").write_bytes(b"keep")
    return {"output_name": "keep"}


def _checkpoints(f, data):
    ckpt = f["output"] / "dco" / "dco_test" / "checkpoints" / "keep"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text("{}")
    return {}


def _file_dataset(f, data):
    return {"dataset_dir": str(data / "img0.png")}


VALIDATION_CASES = [
    # id, inputs (a dict, or a function of (folders, dataset) giving one), the input blamed, message pattern
    ("preset_bogus", {"preset": "bogus"}, "preset", r"preset 'bogus' is not a recipe; choose one of subject, style"),
    ("batch_size_0", {"batch_size": 0}, "batch_size", r"smaller than min of 1"),
    ("resolution_17", {"resolution": 17}, "resolution", r"smaller than min of 64"),
    ("seed_negative", {"seed": -1}, "seed", r"smaller than min of 0"),
    ("steps_negative", {"steps": -5}, "steps", r"smaller than min of 0"),
    ("learning_rate_huge", {"learning_rate": 1.0}, "learning_rate", r"bigger than max"),
    ("mixed_precision_bogus", {"mixed_precision": "fp8"}, "mixed_precision", r"'fp8' not in"),
    ("resume_bogus", {"resume": "newest"}, "resume", r"resume 'newest' is not an option; choose off or latest"),
    ("subject_without_tokens", {"tokens": ""}, "tokens", r"tokens is empty, but the subject preset .* <dog>=dog"),
    ("tokens_malformed", {"tokens": "=toy"}, "tokens", r"Cannot read the token entry '=toy'; write it as <token>=word"),
    ("tokens_twice", {"tokens": "<obj>=toy, <obj>=cup"}, "tokens", r"The token <obj> is listed twice"),
    ("output_exists", _exists, "output_name", r"keep\.safetensors already exists; choose another name or turn on overwrite"),
    ("earlier_checkpoints", _checkpoints, "output_name", r"holds checkpoints .* set resume to latest"),
    ("output_escapes", {"output_name": "../evil"}, "output_name", r"may not contain '\.\.'"),
    ("output_absolute", {"output_name": "/tmp/evil"}, "output_name", r"not an absolute path"),
    ("output_empty", {"output_name": "  "}, "output_name", r"output name is empty; give a name"),
    ("windows_con", {"output_name": "con"}, "output_name", r"'con', a device name that Windows reserves"),
    ("windows_nul_ext", {"output_name": "NUL.txt"}, "output_name", r"device name that Windows reserves"),
    ("windows_com9_folder", {"output_name": "runs/Com9"}, "output_name", r"'Com9', a device name"),
    ("windows_lpt1", {"output_name": "lpt1"}, "output_name", r"Windows reserves"),
    ("windows_colon", {"output_name": "dog:v2"}, "output_name", r"contains ':', which Windows does not allow"),
    ("windows_question", {"output_name": "dog?"}, "output_name", r"contains '\?', which Windows does not allow"),
    ("windows_control", {"output_name": "dog\x07"}, "output_name", r"which Windows does not allow"),
    ("windows_trailing_dot", {"output_name": "dog."}, "output_name", r"ends a name with a dot or a space"),
    ("windows_trailing_space", {"output_name": "dog "}, "output_name", r"ends a name with a dot or a space"),
    ("dataset_missing", {"dataset_dir": "/nowhere/at/all"}, "dataset_dir", r"/nowhere/at/all does not exist; give"),
    ("dataset_empty_field", {"dataset_dir": " "}, "dataset_dir", r"dataset_dir is empty; give a folder of images"),
    ("dataset_is_an_image", _file_dataset, "dataset_dir", r"img0\.png is a file; give a folder of images .* config\.json"),
]


@pytest.mark.parametrize("case,change,field,pattern", VALIDATION_CASES, ids=[c[0] for c in VALIDATION_CASES])
def test_trainer_validation_catches_bad_input_before_anything_runs(folders, case, change, field, pattern):
    data = write_dataset(folders["root"] / "subject", CAPTIONS)
    overrides = change(folders, data) if callable(change) else change
    start = time.perf_counter()
    errors = comfy_validate(node_inputs(data, **overrides))
    assert time.perf_counter() - start < 5.0
    assert errors, f"{case}: ComfyUI accepted it"
    texts = [f"{e['message']}: {e['details']}" for e in errors]
    hits = [e for e, t in zip(errors, texts) if re.search(pattern, t)]
    assert hits, texts
    for text in texts:
        assert_clean_message(text)
    custom = [e for e in errors if e["type"] == "custom_validation_failed"]
    if custom:  # the message goes only to the inputs validate_inputs takes, never to all 25
        assert {e["extra_info"]["input_name"] for e in custom} <= set(VALIDATED)
        assert field in VALIDATED and len({e["details"].split(" - ", 1)[1] for e in custom}) == 1
    else:  # ComfyUI's own range / option check: once, on the input at fault
        assert [e["extra_info"]["input_name"] for e in errors] == [field]
    assert_nothing_written(folders)


def test_good_inputs_pass_comfy_validation(folders):
    data = write_dataset(folders["root"] / "subject", CAPTIONS)
    assert comfy_validate(node_inputs(data)) == []
    assert comfy_validate(node_inputs(data, preset="style", tokens="")) == []


# ------------------------------------------------------------------------ the trainer's execute
def _empty_dataset(f, data, inputs):
    empty = f["root"] / "empty"
    empty.mkdir()
    inputs["dataset_dir"] = str(empty)


def _caption_without_token(f, data, inputs):
    (data / "img1.txt").write_text("a photo of a toy")


def _bad_json(f, data, inputs):
    (f["root"] / "config.json").write_text("{not json")
    inputs.update(dataset_dir=str(f["root"] / "config.json"), tokens="")


def _unknown_config_name(f, data, inputs):
    import json

    (f["root"] / "config.json").write_text(json.dumps({"mine": {"images": [], "prompts": []}}))
    inputs.update(dataset_dir=str(f["root"] / "config.json"), tokens="", config_name="yours")


def _subject_without_tokens(f, data, inputs):
    inputs["tokens"] = ""


def _windows_name(f, data, inputs):
    inputs["output_name"] = "aux"


def _sampling(kind: str, zsnr: bool = False):
    def change(f, data, inputs):
        import comfy_extras.nodes_model_advanced as advanced

        inputs["model"] = harness.call_node(advanced.ModelSamplingDiscrete, model=inputs["model"], sampling=kind,
                                            zsnr=zsnr)[0]
    return change


def _not_sdxl(f, data, inputs):
    from test_comfy_trainer import _sd15_model

    inputs["model"] = _sd15_model()


class _BrokenPeft:
    """A peft that raises on import (a version that does not match transformers, say): a shadow
    package earlier on sys.path, with the real peft modules set aside for the block."""

    def __init__(self, root: Path):
        self.root = root

    def __enter__(self):
        pkg = self.root / "shadow" / "peft"
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('peft 0.0 needs transformers<4')\n")
        self.saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "peft" or k.startswith("peft.")}
        sys.path.insert(0, str(pkg.parent))

    def __exit__(self, *exc):
        sys.path.remove(str(self.root / "shadow"))
        for k in [k for k in sys.modules if k == "peft" or k.startswith("peft.")]:
            del sys.modules[k]
        sys.modules.update(self.saved)


EXECUTE_CASES = [
    ("empty_dataset", _empty_dataset, r"empty has no images .* put the training images there"),
    ("caption_without_token", _caption_without_token, r"img1\.png .* does not contain <obj>"),
    ("config_not_json", _bad_json, r"config\.json is not valid JSON"),
    ("config_name_unknown", _unknown_config_name, r"has no config named 'yours'; the available names are: mine"),
    ("subject_without_tokens", _subject_without_tokens, r"tokens is empty"),
    ("windows_reserved", _windows_name, r"'aux', a device name that Windows reserves"),
    ("not_sdxl", _not_sdxl, r"not an SDXL model"),
    ("x0_sampling", _sampling("x0"), r"x0 prediction, which DCO training cannot train"),
    ("lcm_sampling", _sampling("lcm"), r"LCM \(distilled\), which DCO training cannot train"),
    ("img_to_img_sampling", _sampling("img_to_img"), r"cannot train"),
]


@pytest.mark.parametrize("case,change,pattern", EXECUTE_CASES, ids=[c[0] for c in EXECUTE_CASES])
def test_trainer_execute_refuses_bad_input(folders, case, change, pattern):
    model, clip, vae = graph_models()
    data = write_dataset(folders["root"] / "subject", CAPTIONS)
    inputs = {**node_inputs(data, steps=1), "model": model}
    change(folders, data, inputs)
    start = time.perf_counter()
    with pytest.raises(DCOError, match=pattern) as err:
        run_node(inputs.pop("model"), clip, vae, **inputs)
    assert time.perf_counter() - start < SECONDS
    assert_clean_message(str(err.value))
    assert_nothing_written(folders)


def test_broken_peft_install_gets_an_install_hint(folders):
    model, clip, vae = graph_models()
    data = write_dataset(folders["root"] / "subject", CAPTIONS)
    with _BrokenPeft(folders["root"]), pytest.raises(DCOError) as err:
        run_node(model, clip, vae, **node_inputs(data, steps=1))
    text = str(err.value)
    assert "peft does not import (RuntimeError: peft 0.0 needs transformers<4)" in text
    assert "pip install -r custom_nodes/ComfyUI-DCO/requirements.txt" in text
    assert_clean_message(text)
    assert_nothing_written(folders)
    import peft  # the real one is back

    assert hasattr(peft, "LoraConfig")


def test_v_prediction_and_zsnr_come_from_model_sampling():
    """ComfyUI's ModelSamplingDiscrete node changes only model_sampling; the trainer must follow it."""
    import comfy_extras.nodes_model_advanced as advanced

    convert = harness.pack_module("nodes.convert")
    model, _, _ = graph_models()
    assert convert.sampling_schedule(model) == {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}
    for kind, zsnr, expected in (("v_prediction", False, "v_prediction"), ("v_prediction", True, "v_prediction"),
                                 ("eps", False, "epsilon")):
        patched = harness.call_node(advanced.ModelSamplingDiscrete, model=model, sampling=kind, zsnr=zsnr)[0]
        assert patched.model.model_type == model.model.model_type  # what the old code read
        assert convert.sampling_schedule(patched) == {"prediction_type": expected, "rescale_betas_zero_snr": zsnr}
    comps = convert.components_from_graph(
        harness.call_node(advanced.ModelSamplingDiscrete, model=model, sampling="v_prediction", zsnr=True)[0],
        graph_models()[1], torch.device("cpu"), torch.float32)
    sched = comps.training_scheduler()
    assert sched.config.prediction_type == "v_prediction" and float(sched.alphas_cumprod[-1]) < 1e-6


# ------------------------------------------------------------------------ token loader, prompt pair
@pytest.fixture
def clip_and_embeddings(folders):
    _, clip, _ = graph_models()
    return clip, folders["embeddings"]


def _load_tokens(clip, name, tokens=""):
    import folder_paths

    folder_paths.filename_list_cache.pop("embeddings", None)
    return harness.call_node(emb_nodes.DCOLoadTokenEmbeddings, clip=clip, embeddings=name, tokens=tokens)[0]


def _emb_file(folder: Path, name: str, width_l: int, width_g: int, rows: int = 1) -> str:
    from safetensors.torch import save_file

    save_file({"clip_l": torch.randn(rows, width_l), "clip_g": torch.randn(rows, width_g)}, str(folder / name))
    return name


LOADER_CASES = [
    ("missing_file", lambda d: "gone.safetensors", "", r"'gone\.safetensors' is not in ComfyUI's embeddings folder"),
    ("wrong_width", lambda d: _emb_file(d, "wide.safetensors", harness.HIDDEN_L + 8, harness.HIDDEN_G), "<obj>",
     r"wide\.safetensors: its clip_l rows are 40 wide .* Load embeddings made for this checkpoint"),
    ("not_safetensors", lambda d: (d / "junk.safetensors").write_bytes(b"\x00" * 64) and "junk.safetensors", "<obj>",
     r"junk\.safetensors: it is not a valid safetensors file"),
    ("too_many_tokens", lambda d: _emb_file(d, "one.safetensors", harness.HIDDEN_L, harness.HIDDEN_G), "<a>, <b>",
     r"one\.safetensors: .* 2 token\(s\) \(<a>, <b>\); give at most 1"),
    ("bad_token_text", lambda d: _emb_file(d, "two.safetensors", harness.HIDDEN_L, harness.HIDDEN_G), "<a:b>",
     r"<a:b>.* a token is one word"),
]


@pytest.mark.parametrize("case,make,tokens,pattern", LOADER_CASES, ids=[c[0] for c in LOADER_CASES])
def test_token_loader_refuses_bad_files(folders, clip_and_embeddings, case, make, tokens, pattern):
    clip, folder = clip_and_embeddings
    name = make(folder)
    start = time.perf_counter()
    with pytest.raises(DCOError, match=pattern) as err:
        _load_tokens(clip, name, tokens)
    assert time.perf_counter() - start < SECONDS
    assert_clean_message(str(err.value))


PAIR_CASES = [
    ("unknown_token", "a photo of <cat>", "", r"<cat>, which the token CLIP does not know.*DCO Load Token Embeddings"),
    ("word_map_malformed", "a photo of <obj>", "obj", r"word map entry 'obj' is not of the form <token>=word"),
]


@pytest.mark.parametrize("case,text,word_map,pattern", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_prompt_pair_refuses_bad_prompts(folders, case, text, word_map, pattern):
    _, clip, _ = graph_models()
    with pytest.raises(DCOError, match=pattern) as err:
        harness.call_node(emb_nodes.DCOPromptPair, token_clip=clip, base_clip=clip, text=text, word_map=word_map)
    assert_clean_message(str(err.value))


# ------------------------------------------------------------------------ the guider
def _conds(clip):
    cond = harness.encode(clip, "a photo")
    return {"positive_token": cond, "positive_base": cond, "negative": cond}


GUIDER_CASES = [
    ("model_ft_without_lora", 7.5, 3.0, r"model_ft carries no LoRA on top of model.*LoraLoader"),
    ("rg_nan", 7.5, math.nan, r"rg must be a number from 0 to 100, not nan"),
    ("cfg_infinite", math.inf, 3.0, r"cfg must be a number from 0 to 100, not inf"),
    ("rg_negative", 7.5, -1.0, r"rg must be a number from 0 to 100, not -1\.0"),
    ("cfg_too_big", 500.0, 3.0, r"cfg must be a number from 0 to 100"),
]


@pytest.mark.parametrize("node", ["DCORewardGuidanceGuider", "DCORewardGuidanceSampler"])
@pytest.mark.parametrize("case,cfg,rg,pattern", GUIDER_CASES, ids=[c[0] for c in GUIDER_CASES])
def test_guider_refuses_bad_input(node, case, cfg, rg, pattern):
    model, clip, _ = graph_models()
    cls = getattr(guider_mod, node)
    extra = {} if node == "DCORewardGuidanceGuider" else dict(
        latent_image={"samples": torch.zeros(1, 4, 8, 8)}, seed=0, steps=1, sampler_name="euler",
        scheduler="normal", denoise=1.0)
    with pytest.raises(DCOError, match=pattern) as err:
        with torch.inference_mode():
            harness.call_node(cls, model=model, model_ft=model.clone(), cfg=cfg, rg=rg, **_conds(clip), **extra)
    assert_clean_message(str(err.value))
    if case != "model_ft_without_lora":  # ComfyUI's validation answers before the node runs
        assert cls.validate_inputs(cfg=cfg, rg=rg) == str(err.value)


def test_guider_allows_the_same_model_for_plain_cfg():
    model, clip, _ = graph_models()
    guider = harness.call_node(guider_mod.DCORewardGuidanceGuider, model=model, model_ft=model.clone(), cfg=7.5,
                               rg=0.0, **_conds(clip))[0]
    assert guider.rg == 0.0
