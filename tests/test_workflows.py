"""The shipped example workflows, checked without ComfyUI.

Every workflow parses, names only our nodes or the stock nodes of `tests/data/stock_nodes.json`,
has consistent links, and its `widgets_values` line up with our nodes' current inputs as read from
`nodes/*.py` (tests/node_schemas.py), so renaming or adding an input fails here until the workflows
are rebuilt. The same checks run against ComfyUI's live node list in tests/comfy/test_comfy_frontend.py.
Also: the README documents each workflow with a screenshot and carries the generated node reference.
"""

from __future__ import annotations

import copy
import re

import pytest

import node_schemas
from workflow_rules import (ROOT, WORKFLOW_DIR, check_workflow, load_workflow, stock_schemas, workflow_files)

NAMES = ["dco_load_subject", "dco_subject_rg", "dco_subject_style_merge", "dco_train_style", "dco_train_subject"]
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def schemas():
    return {**stock_schemas(), **node_schemas.load()}


def _wf(name: str) -> dict:
    return load_workflow(WORKFLOW_DIR / f"{name}.json")


def _values(node: dict, schema) -> dict:
    """A node's widget values by input name (control widgets left out)."""
    return {s.name: v for (s, control), v in zip(schema.widget_slots(), node["widgets_values"]) if not control}


def _nodes(wf: dict, typ: str) -> list[dict]:
    return [n for n in wf["nodes"] if n["type"] == typ]


def test_every_workflow_ships_with_a_jpeg_thumbnail():
    assert [p.stem for p in workflow_files()] == NAMES
    for name in NAMES:
        thumb = WORKFLOW_DIR / f"{name}.jpg"
        assert thumb.is_file(), f"{thumb} is missing; the Templates browser shows it"
        assert thumb.read_bytes()[:3] == b"\xff\xd8\xff", f"{thumb} is not a JPEG"
        for path in (thumb, WORKFLOW_DIR / f"{name}.json"):
            assert path.stat().st_size < 1_000_000, f"{path} is over 1 MB"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_is_consistent_with_the_current_nodes(name, schemas):
    problems = check_workflow(_wf(name), schemas)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_uses_the_stock_checkpoint_loader_and_no_test_node(name):
    types = {n["type"] for n in _wf(name)["nodes"]}
    assert "CheckpointLoaderSimple" in types
    assert not {t for t in types if "Test" in t}, "test-only nodes must never ship in a workflow"


def test_train_subject_trains_a_dog_token_and_samples_with_the_rg_guider(schemas):
    wf = _wf("dco_train_subject")
    (trainer,) = _nodes(wf, "DCOTrainer")
    v = _values(trainer, schemas["DCOTrainer"])
    assert v["preset"] == "subject" and v["tokens"] == "<dog>=dog"
    for typ in ("CheckpointLoaderSimple", "DCORewardGuidanceGuider", "SamplerCustomAdvanced", "SaveImage"):
        assert _nodes(wf, typ), f"dco_train_subject has no {typ}"
    links = {tuple(link[1:3]) + (link[3],) for link in wf["links"]}
    (guider,) = _nodes(wf, "DCORewardGuidanceGuider")
    assert (trainer["id"], 0, guider["id"]) in links, "the guider's model_ft is the trainer's MODEL"


def test_train_style_uses_the_style_preset_with_offset_noise(schemas):
    (trainer,) = _nodes(_wf("dco_train_style"), "DCOTrainer")
    v = _values(trainer, schemas["DCOTrainer"])
    assert v["preset"] == "style" and v["tokens"] == "" and v["offset_noise"] == pytest.approx(0.1)


def test_subject_rg_loads_lora_and_tokens_and_samples_with_the_guider():
    wf = _wf("dco_subject_rg")
    for typ in ("LoraLoader", "DCOLoadTokenEmbeddings", "DCOPromptPair", "DCORewardGuidanceGuider",
                "SamplerCustomAdvanced"):
        assert len(_nodes(wf, typ)) == 1, f"dco_subject_rg needs one {typ}"


def test_load_subject_feeds_both_models_both_clips_and_its_scales_to_the_guider():
    wf = _wf("dco_load_subject")
    (loader,) = _nodes(wf, "DCOLoadSubject")
    (guider,) = _nodes(wf, "DCORewardGuidanceGuider")
    (pair,) = _nodes(wf, "DCOPromptPair")
    assert not _nodes(wf, "LoraLoader") and not _nodes(wf, "DCOLoadTokenEmbeddings"), "one pick replaces the chain"
    by_id = {n["id"]: n for n in wf["nodes"]}
    fed = {(link[2], link[3], by_id[link[3]]["inputs"][link[4]]["name"]) for link in wf["links"] if link[1] == loader["id"]}
    assert {(0, guider["id"], "model"), (1, guider["id"], "model_ft"), (4, guider["id"], "cfg"),
            (5, guider["id"], "rg")} <= fed
    assert {(2, pair["id"], "token_clip"), (3, pair["id"], "base_clip")} <= fed


def test_merge_chains_two_stock_lora_loaders_into_rg_sampling():
    wf = _wf("dco_subject_style_merge")
    first, second = _nodes(wf, "LoraLoader")
    chained = [link for link in wf["links"] if link[1] == first["id"] and link[3] == second["id"]]
    assert {link[5] for link in chained} == {"MODEL", "CLIP"}, "the style loader takes the subject loader's MODEL and CLIP"
    (sampler,) = _nodes(wf, "DCORewardGuidanceSampler")
    assert any(link[1] == second["id"] and link[3] == sampler["id"] and link[5] == "MODEL" for link in wf["links"])


@pytest.mark.parametrize("break_it, expected", [
    (lambda wf, t: t["widgets_values"].pop(), "widgets_values for"),
    (lambda wf, t: t["widgets_values"].insert(0, "extra"), "widgets_values for"),
    (lambda wf, t: t["widgets_values"].__setitem__(1, "portrait"), "is not one of ['subject', 'style']"),
    (lambda wf, t: t["widgets_values"].__setitem__(5, "many"), "is not a INT"),
    (lambda wf, t: t.__setitem__("type", "DCOTrainerOld"), "neither one of our nodes nor a known stock node"),
    (lambda wf, t: wf["links"][0].__setitem__(5, "CLIP"), "is typed CLIP"),
    (lambda wf, t: wf["links"].pop(0), "which does not exist"),
    (lambda wf, t: next(n for n in wf["nodes"] if n["type"] == "RandomNoise")["widgets_values"].__setitem__(1, "randomize"),
     "must be fixed"),
])
def test_the_checker_catches_broken_workflows(break_it, expected, schemas):
    wf = copy.deepcopy(_wf("dco_train_subject"))
    trainer = _nodes(wf, "DCOTrainer")[0]
    break_it(wf, trainer)
    problems = check_workflow(wf, schemas)
    assert any(expected in p for p in problems), problems


def test_static_schema_parse_reads_every_registered_node():
    schemas = node_schemas.load()
    assert set(schemas) == {"DCOTrainer", "DCOLoadTokenEmbeddings", "DCOPromptPair", "DCORewardGuidanceGuider",
                            "DCORewardGuidanceSampler", "DCOLoadSubject"}
    for schema in schemas.values():
        assert schema.inputs and schema.outputs and schema.category.startswith("DCO/")
        missing = [s.name for s in schema.inputs + schema.outputs if not s.tooltip]
        assert not missing, f"{schema.node_id}: no tooltip on {missing}"


def test_static_schema_parse_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "registry.py").write_text("from .odd import Odd\n")
    (tmp_path / "odd.py").write_text(
        "class Odd:\n    @classmethod\n    def define_schema(cls):\n"
        "        return io.Schema(node_id='Odd', inputs=make_inputs_somehow(), outputs=[])\n")
    with pytest.raises(node_schemas.SchemaParseError, match="cannot read inputs statically"):
        node_schemas.load(tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_readme_documents_each_workflow_with_a_screenshot(name):
    assert f"example_workflows/{name}.json" in README, f"the README does not describe {name}"
    shots = re.findall(rf"\]\((docs/{name}[^)]*\.(?:jpg|png))\)", README)
    assert shots, f"the README has no screenshot of {name}"
    for shot in shots:
        path = ROOT / shot
        assert path.is_file() and path.stat().st_size < 300_000, f"{shot} is missing or over 300 KB"


def test_readme_node_reference_is_current():
    expected = node_schemas.reference_markdown()
    assert expected in README, ("The README's node reference is out of date with nodes/*.py; "
                                "regenerate it with: python tests/node_schemas.py")


@pytest.mark.parametrize("name", ["dco_train_subject", "dco_train_style"])
def test_training_workflows_ship_settings_that_fit_12_gib(name, schemas):
    """The shipped graphs train at 1024²: without gradient checkpointing the budget is ~15–18 GiB
    (bench/sdxl_budget.py), so they must keep TrainConfig's default (on)."""
    from dco_train.config import TrainConfig

    (trainer,) = _nodes(_wf(name), "DCOTrainer")
    v = _values(trainer, schemas["DCOTrainer"])
    assert v["gradient_checkpointing"] is TrainConfig().gradient_checkpointing is True
    assert v["batch_size"] == 1 and v["use_8bit_adam"] is False
