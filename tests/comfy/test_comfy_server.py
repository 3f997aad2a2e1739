"""The pack inside a real ComfyUI server: loading, /object_info, and graphs run by ComfyUI's executor.

A throwaway base directory holds `custom_nodes/` (links to this repository and to the test-only
`fixture_pack/`), `models/loras` and `models/embeddings` with files written by the engine, so
nothing in the ComfyUI checkout is touched. The server runs on a free port with an in-memory
database and is stopped (by its own PID) after the module.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import harness

harness.require()

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

formats = harness.pack_module("dco_train.formats")
OUR_NODES = ("DCOLoadTokenEmbeddings", "DCOPromptPair", "DCORewardGuidanceGuider", "DCORewardGuidanceSampler")
START_TIMEOUT = 180


class Server:
    def __init__(self, base: Path):
        self.base = base
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        comfy = harness.comfy_path()
        python = comfy / ".venv" / "bin" / "python"
        cmd = [str(python if python.exists() else sys.executable), "main.py", "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", "--disable-api-nodes"]
        self.log = open(self.log_path, "w")
        # one torch thread: on a 2-core machine shared with the test process (and a browser), two
        # OpenMP threads per process oversubscribe the cores and slow a tiny training step ~50x
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("DCO_SERVER_THREADS", "1")}
        self.proc = subprocess.Popen(cmd, cwd=comfy, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up:\n{self.log_text()[-3000:]}")
            try:
                self.get("/object_info/KSampler")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"ComfyUI did not answer within {START_TIMEOUT} s:\n{self.log_text()[-3000:]}")
                time.sleep(0.5)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def run(self, prompt: dict, timeout: float = 120) -> dict:
        prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": "dco-tests"})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = harness.server_base(tmp_path_factory.mktemp("comfy-base"))
    harness.save_engine_lora(base / "models" / "loras" / "subject.safetensors", harness.build_model(seed=0), rank=4,
                             alpha=4.0, seed=1, text_encoders=True)
    gen = torch.Generator().manual_seed(0)
    formats.save_embeddings(base / "models" / "embeddings" / "pets.safetensors", formats.TokenEmbeddings(
        tokens=["<dog>"], clip_l=torch.randn(1, harness.HIDDEN_L, generator=gen), clip_g=torch.randn(1, harness.HIDDEN_G, generator=gen),
        initializers=["dog"]))
    formats.save_embeddings(base / "models" / "embeddings" / "sd15.safetensors", formats.TokenEmbeddings(
        tokens=["<dog>"], clip_l=torch.randn(1, 768, generator=gen), clip_g=torch.randn(1, 1280, generator=gen)))
    srv = Server(base)
    try:
        yield srv
    finally:
        srv.stop()


def test_pack_loads_without_import_errors(server):
    log = server.log_text()
    ours = [line for line in log.splitlines() if "ComfyUI-DCO" in line or "dco_test_fixture" in line]
    assert any("seconds:" in line and line.rstrip().endswith("ComfyUI-DCO") for line in ours), log[-3000:]
    assert not [line for line in ours if "IMPORT FAILED" in line or "Cannot import" in line], log[-3000:]
    assert "Error while calling comfy_entrypoint" not in log
    info = server.get("/object_info")
    for node_id in OUR_NODES:
        assert node_id in info, f"{node_id} missing from /object_info"
    assert "DCOTestTinySDXL" in info


@pytest.mark.parametrize("node_id", OUR_NODES)
def test_object_info_has_help_text(server, node_id):
    info = server.get(f"/object_info/{node_id}")[node_id]
    assert info["category"].startswith("DCO/") and info["display_name"] and info["description"]
    assert "ComfyUI-DCO" in info["python_module"]
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    for name, spec in inputs.items():
        assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert len(info["output_tooltips"]) == len(info["output"]) and all(info["output_tooltips"])
    assert not set(inputs) & set(info["output_name"]), "input and output ids must differ (v0.3.64 drops the pack)"


def _graph(embeddings: str = "pets.safetensors") -> dict:
    """Tiny SDXL -> stock LoraLoader -> our token loader and prompt pair -> our guider with
    SamplerCustomAdvanced, and the one-node sampler, both saving their latent."""
    common = {"model": ["1", 0], "model_ft": ["2", 0], "positive_token": ["4", 0], "positive_base": ["4", 1],
              "negative": ["5", 0]}
    return {
        "1": {"class_type": "DCOTestTinySDXL", "inputs": {"seed": 0}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": "subject.safetensors",
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "DCOLoadTokenEmbeddings", "inputs": {"clip": ["2", 1], "embeddings": embeddings, "tokens": ""}},
        "4": {"class_type": "DCOPromptPair", "inputs": {"token_clip": ["3", 0], "base_clip": ["1", 1],
                                                        "text": "a photo of <dog> on a beach", "word_map": ""}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "6": {"class_type": "DCORewardGuidanceGuider", "inputs": {**common, "cfg": 5.0, "rg": 3.0}},
        "7": {"class_type": "RandomNoise", "inputs": {"noise_seed": 42}},
        "8": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
        "9": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "karras", "steps": 3, "denoise": 1.0}},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "11": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["7", 0], "guider": ["6", 0], "sampler": ["8", 0],
                                                                 "sigmas": ["9", 0], "latent_image": ["10", 0]}},
        "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "dco_guider"}},
        "13": {"class_type": "DCORewardGuidanceSampler", "inputs": {
            **common, "latent_image": ["10", 0], "seed": 42, "steps": 3, "cfg": 5.0, "rg": 3.0,
            "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "dco_sampler"}},
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["1", 2]}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "dco_image"}},
    }


def test_graph_runs_through_the_executor(server):
    entry = server.run(_graph())
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[-3000:]
    out = server.base / "output"
    a = load_file(str(next(out.glob("dco_guider_*.latent"))))["latent_tensor"]
    b = load_file(str(next(out.glob("dco_sampler_*.latent"))))["latent_tensor"]
    assert a.shape == (1, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b), "guider + SamplerCustomAdvanced and the one-node sampler must agree exactly"
    assert list(out.glob("dco_image_*.png"))
    assert "lora key not loaded" not in server.log_text()


def test_node_errors_reach_the_user(server):
    entry = server.run(_graph("sd15.safetensors"))
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "DCOLoadTokenEmbeddings"
    assert "sd15.safetensors" in errors[0]["exception_message"] and "768 wide" in errors[0]["exception_message"]
