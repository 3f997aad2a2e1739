"""DCOTrainer through ComfyUI's own execution path: POST /prompt on a real server.

The graph trains a subject on the tiny in-process SDXL (the test-only fixture pack) and samples
with the trained MODEL/CLIP through the RG sampler in the same run; a second prompt loads the
new file with the stock LoraLoader, which must map every key.
"""

from __future__ import annotations

import pytest

import harness

harness.require()

from test_comfy_server import Server  # noqa: E402
from test_comfy_trainer import CAPTIONS, write_dataset  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = harness.server_base(tmp_path_factory.mktemp("comfy-train"))
    write_dataset(base / "input" / "dco" / "star", CAPTIONS)
    srv = Server(base)
    try:
        yield srv
    finally:
        srv.stop()


def _train_graph(name: str) -> dict:
    return {
        "1": {"class_type": "DCOTestTinySDXL", "inputs": {"seed": 0}},
        "2": {"class_type": "DCOTrainer", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset_dir": "dco/star", "config_name": "",
            "preset": "subject", "tokens": "<obj>=toy", "output_name": name, "overwrite": False, "steps": 3, "rank": 4,
            "learning_rate": 1e-3, "text_encoder_lr": 1e-3, "beta": 1000.0, "resolution": 64, "batch_size": 1,
            "offset_noise": -1.0, "seed": 0, "mixed_precision": "no", "gradient_checkpointing": False,
            "use_8bit_adam": False, "checkpoint_every": 0, "resume": "off", "validation_prompt": "",
            "validation_every": 0}},
        "3": {"class_type": "DCOPromptPair", "inputs": {"token_clip": ["2", 1], "base_clip": ["1", 1],
                                                        "text": "a photo of a <obj> on the beach", "word_map": ""}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "DCORewardGuidanceSampler", "inputs": {
            "model": ["1", 0], "model_ft": ["2", 0], "positive_token": ["3", 0], "positive_base": ["3", 1],
            "negative": ["4", 0], "latent_image": ["5", 0], "seed": 1, "steps": 2, "cfg": 5.0, "rg": 3.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "dco_trained"}},
    }


def test_trainer_runs_in_a_server_and_its_lora_loads_with_the_stock_loader(server):
    entry = server.run(_train_graph("srv_subject"), timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert (server.base / "models/loras/srv_subject.safetensors").is_file()
    assert (server.base / "models/embeddings/srv_subject.safetensors").is_file()
    assert list((server.base / "output").glob("dco_trained_*.latent"))
    assert (server.base / "output/dco/srv_subject/metrics.jsonl").is_file()
    # the new file is listed without a restart and the stock LoraLoader maps every key
    assert "srv_subject.safetensors" in server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    graph = {
        "1": {"class_type": "DCOTestTinySDXL", "inputs": {"seed": 0}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "srv_subject.safetensors",
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a toy"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 0, "steps": 1, "cfg": 2.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "dco_stock"}},
    }
    entry = server.run(graph)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "lora key not loaded" not in server.log_text()


def test_trainer_has_tooltips_in_object_info(server):
    info = server.get("/object_info/DCOTrainer")["DCOTrainer"]
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert all(spec[1].get("tooltip") for spec in inputs.values() if len(spec) > 1)
    assert info["output_node"] is True and info["category"] == "DCO/training"
    assert not set(inputs) & set(info["output_name"])


def test_bad_output_name_is_refused_before_anything_runs(server):
    import json
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as err:
        server.post("/prompt", {"prompt": _train_graph("../escape"), "client_id": "dco-tests"})
    body = json.loads(err.value.read())
    assert err.value.code == 400 and "may not contain '..'" in json.dumps(body)
    assert not list((server.base / "models/loras").glob("*escape*"))
