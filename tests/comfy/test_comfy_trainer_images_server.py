"""DCOTrainer on images from the graph, through ComfyUI's own executor (POST /prompt on a server).

The issue's acceptance graph: stock nodes generate three images on the tiny test SDXL, DCO Trainer
learns <obj> from them with one caption per line, and the trained MODEL/CLIP sample through the RG
guider, all in one prompt (`workflows.train_on_generated`, reusable from a browser test). Also the
image and text lists of ComfyUI's LoadImageTextDataSetFromFolder (v0.8.0 and later), which reach
the node whole only because it takes input lists, and a validation error before anything runs.
"""

from __future__ import annotations

import json
import urllib.error

import pytest

import harness

harness.require()

import workflows  # noqa: E402
from test_comfy_server import Server  # noqa: E402
from test_comfy_trainer import write_dataset  # noqa: E402

TRAINER = "7"  # the trainer's id in workflows.train_on_generated


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = harness.server_base(tmp_path_factory.mktemp("comfy-images"))
    pets = write_dataset(base / "input" / "pets", ["a photo of a <obj> on a table", "a <obj> in the snow"])
    from PIL import Image

    Image.new("RGB", (128, 64), (20, 200, 90)).save(pets / "img1.png")  # the second image another size
    srv = Server(base)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def _messages(entry: dict, kind: str) -> list[dict]:
    return [m[1] for m in entry["status"]["messages"] if m[0] == kind]


def _cached(entry: dict) -> set[str]:
    return {n for m in _messages(entry, "execution_cached") for n in m["nodes"]}


def test_generate_train_and_sample_in_one_graph(server, object_info):
    prompt = workflows.api_prompt(workflows.train_on_generated(), object_info)
    prompt[TRAINER]["inputs"]["overwrite"] = True  # the re-runs below write the same name
    entry = server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", _messages(entry, "execution_error")
    lora = server.base / "models/loras/dco_generated.safetensors"
    assert lora.is_file() and (server.base / "models/embeddings/dco_generated.safetensors").is_file()
    assert list((server.base / "output").glob("dco_generated_*.png")), "the RG sample was not saved"
    assert "lora key not loaded" not in server.log_text()
    first = lora.stat().st_mtime_ns
    # the same prompt is cached whole; new images upstream (another KSampler seed) train again
    again = server.run(prompt, timeout=120)
    assert TRAINER in _cached(again) and lora.stat().st_mtime_ns == first
    prompt["5"]["inputs"]["seed"] = 8
    third = server.run(prompt, timeout=900)
    assert third["status"]["status_str"] == "success", _messages(third, "execution_error")
    assert TRAINER not in _cached(third) and lora.stat().st_mtime_ns != first


def test_a_caption_without_the_token_is_refused_before_anything_runs(server, object_info):
    prompt = workflows.api_prompt(workflows.train_on_generated(), object_info)
    prompt[TRAINER]["inputs"].update(captions="a photo of a <obj>\na photo of a toy\na <obj>", output_name="refused")
    with pytest.raises(urllib.error.HTTPError) as err:
        server.post("/prompt", {"prompt": prompt, "client_id": "dco-tests"})
    body = json.dumps(json.loads(err.value.read()))
    assert err.value.code == 400 and "caption 2 ('a photo of a toy') does not contain <obj>" in body
    prompt[TRAINER]["inputs"].update(captions="\n".join(workflows.GENERATED_CAPTIONS), dataset_dir="dco/my_subject")
    with pytest.raises(urllib.error.HTTPError) as err:
        server.post("/prompt", {"prompt": prompt, "client_id": "dco-tests"})
    assert "dataset_dir is 'dco/my_subject' and images are connected" in json.dumps(json.loads(err.value.read()))
    assert not list((server.base / "models/loras").glob("refused*"))


def test_load_image_text_dataset_lists_train_in_one_run(server, object_info):
    if "LoadImageTextDataSetFromFolder" not in object_info:
        pytest.skip(f"ComfyUI {harness.comfy_version()} has no LoadImageTextDataSetFromFolder node")
    spec = {"nodes": [
        {"id": 1, "type": "DCOTestTinySDXL", "widgets": {"seed": 0}},
        {"id": 2, "type": "LoadImageTextDataSetFromFolder", "widgets": {"folder": "pets"}},
        {"id": 3, "type": "DCOTrainer", "widgets": {
            "dataset_dir": "", "tokens": "<obj>=toy", "output_name": "dco_pets", "steps": 2, "rank": 4,
            "resolution": 128, "mixed_precision": "no", "validation_every": 0}},
    ], "links": [(1, 0, 3, "model"), (1, 1, 3, "clip"), (1, 2, 3, "vae"), (2, 0, 3, "images"), (2, 1, 3, "captions")]}
    entry = server.run(workflows.api_prompt(spec, object_info), timeout=600)
    assert entry["status"]["status_str"] == "success", _messages(entry, "execution_error")
    assert (server.base / "models/loras/dco_pets.safetensors").is_file()
    log = server.log_text()
    # one run on both images (a node without input lists would run once per image, on one image each)
    assert log.count("Only 2 training images") == 1 and "Only 1 training image" not in log
