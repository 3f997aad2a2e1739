"""The command line: the reference README's commands, the demo, single files, two processes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, SEED_DIR
from dco_train.formats import load_embeddings, load_lora

needs_seed = pytest.mark.skipif(not SEED_DIR.is_dir(), reason=f"reference seed data not found at {SEED_DIR}")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# Shrink the reference runs (2000 steps at 1024 px) to a few tiny steps; argparse keeps the last value.
SHRINK = ["--max_train_steps=2", "--resolution=64", "--no_progress"]


def cli(*args, cwd=REPO, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "dco_train", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    return proc


def summary(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_seed
def test_reference_subject_command(tiny_model_dir, tmp_path):
    out = tmp_path / "output"
    proc = cli(  # the reference README's subject command, verbatim apart from the program name
        "train", f"--pretrained_model_name_or_path={tiny_model_dir}",
        '--config_dir=dataset/dreambooth/dog/config.json', '--config_name=full_ti', f"--output_dir={out}",
        "--learning_rate=5e-5", "--text_encoder_lr=5e-6", "--dcoloss_beta=1000", "--rank=32",
        "--max_train_steps=2000", "--checkpointing_steps=1000", '--seed=0', "--train_text_encoder_ti",
        *SHRINK, cwd=SEED_DIR,
    )
    s = summary(proc)
    assert set(s) >= {"lora", "embeddings", "log", "checkpoints"}
    assert load_embeddings(s["embeddings"]).tokens == ["<dog>"]
    unet = load_lora(s["lora"]).modules["unet"]
    assert next(iter(unet.values())).rank == 32
    assert len(Path(s["log"]).read_text().splitlines()) >= 2


@needs_seed
def test_reference_style_command(tiny_model_dir, tmp_path):
    style = ["train", f"--pretrained_model_name_or_path={tiny_model_dir}", '--config_dir=dataset/styledrop/config.json',
             f"--output_dir={tmp_path / 'output_style'}", "--learning_rate=5e-5", "--dcoloss_beta=1000", "--rank=64",
             "--max_train_steps=1000", '--seed=0', "--offset_noise=0.1"]
    bad = cli(*style, '--config_name=style_1', *SHRINK, cwd=SEED_DIR)
    assert bad.returncode == 2
    assert "no config named 'style_1'; the available names are: style" in bad.stderr
    assert not (tmp_path / "output_style").exists()
    s = summary(cli(*style, '--config_name=style', *SHRINK, cwd=SEED_DIR))
    assert s["embeddings"] is None and Path(s["lora"]).is_file()


def test_demo_runs_in_under_two_minutes(tmp_path):
    start = time.perf_counter()
    proc = cli("demo", "--output", str(tmp_path / "demo"), timeout=300)
    elapsed = time.perf_counter() - start
    s = summary(proc)
    assert elapsed < 120, f"the demo took {elapsed:.0f} s"
    for run in ("subject", "style"):
        lora = load_lora(s[run]["lora"])
        assert lora.modules["unet"] and all(k.startswith("lora_unet_") for k in lora.modules["unet"])
        assert Path(s[run]["log"]).is_file() and s[run]["checkpoints"]
    assert load_embeddings(s["subject"]["embeddings"]).tokens == ["<obj>"]
    from PIL import Image

    for key in ("loss_curves", "rg_subject", "rg_subject_style"):
        assert Image.open(s[key]).size[0] > 100


def test_single_file_checkpoint_round_trip(tiny, tokenizer_dir, tmp_path):
    from dco_train.models import load_sdxl, save_single_file
    from dco_train.text import encode_prompts

    path = save_single_file(tiny, tmp_path / "tiny_sdxl.safetensors")
    loaded = load_sdxl(path, tokenizer_dir=tokenizer_dir)
    g = torch.Generator().manual_seed(0)
    x, c, p = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 128, generator=g), torch.randn(1, 64, generator=g)
    kw = dict(added_cond_kwargs={"text_embeds": p, "time_ids": torch.tensor([[64.0, 48, 8, 0, 64, 64]])})
    # same weights, only float32 rounding from different memory layouts: tolerance 1e-5
    with torch.no_grad():
        diff = (tiny.unet(x, 400, c, **kw).sample - loaded.unet(x, 400, c, **kw).sample).abs().max().item()
        assert diff < 1e-5
        a = encode_prompts(tiny.tokenizers, tiny.text_encoders, ["a photo of a dog"])
        b = encode_prompts(loaded.tokenizers, loaded.text_encoders, ["a photo of a dog"])
        assert (a.embeds - b.embeds).abs().max().item() < 1e-5 and (a.pooled - b.pooled).abs().max().item() < 1e-5
        img = torch.rand(1, 3, 64, 64) * 2 - 1
        va, vb = tiny.vae.encode(img).latent_dist.mean, loaded.vae.encode(img).latent_dist.mean
        assert (va - vb).abs().max().item() < 1e-5
    s = summary(cli("train", f"--pretrained_model_name_or_path={path}", f"--tokenizer_dir={tokenizer_dir}",
                    "--data_dir", str(_style_folder(tmp_path)), "--preset", "style", f"--output_dir={tmp_path / 'o'}",
                    *SHRINK))
    assert Path(s["lora"]).is_file()


def _style_folder(tmp_path):
    from helpers import write_images

    return write_images(tmp_path / "style", ["a house in flat cartoon illustration style"], size=(64, 64))


def test_two_processes(tiny_model_dir, subject_dir, tmp_path):
    """The multi-GPU path (accelerate launch, two processes, gloo on the CPU)."""
    out = tmp_path / "mp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dco_train", "train", "--cpu",
           f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_dir={subject_dir}", "--tokens", "<obj>=toy",
           "--preset", "subject", f"--output_dir={out}", "--checkpointing_steps=2", "--rank=4", *SHRINK[:-1],
           "--max_train_steps=3", "--no_progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    s = summary(proc)
    assert proc.stdout.count('"lora"') == 1  # only the main process reports (and writes)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "embeddings.safetensors", "lora.safetensors", "metrics.jsonl"]
    assert all(k.startswith("lora_unet_") for k in load_lora(s["lora"]).modules["unet"])
    from dco_train.checkpoint import load_checkpoint

    ck = load_checkpoint(out / "checkpoints/checkpoint-2")
    assert len(ck.rng) == 2 and not torch.equal(ck.rng[0], ck.rng[1])  # one generator per process
    assert len([l for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]) == 3


def test_accelerate_cpu_launch(tiny_model_dir, subject_dir, tmp_path):
    """The issue's literal command, `accelerate launch --cpu --num_processes 2 -m dco_train train`.
    accelerate 1.x starts one process for `--cpu` unless MPI is configured (test_two_processes covers
    two); the run must still complete on the CPU and write the usual files."""
    out = tmp_path / "cpu"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dco_train", "train",
           f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_dir={subject_dir}", "--tokens", "<obj>=toy",
           "--preset", "subject", f"--output_dir={out}", "--rank=4", *SHRINK]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    s = summary(proc)
    assert proc.stdout.count('"lora"') == 1
    assert sorted(load_embeddings(s["embeddings"]).tokens) == ["<obj>"]
    assert all(k.startswith("lora_unet_") for k in load_lora(s["lora"]).modules["unet"])


def test_sample_command(tiny_model_dir, subject_dir, tmp_path):
    s = summary(cli("train", f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_dir={subject_dir}",
                    "--tokens", "<obj>=toy", "--preset", "subject", f"--output_dir={tmp_path / 't'}", *SHRINK))
    out = summary(cli("sample", f"--pretrained_model_name_or_path={tiny_model_dir}", "--lora", f"{s['lora']}:0.8",
                      "--embeddings", s["embeddings"], "--prompt", "a <obj> on the beach", "--width", "64",
                      "--height", "48", "--num_images", "2", "--steps", "3", "--scheduler", "dpmpp_2m",
                      "--output_dir", str(tmp_path / "samples")))
    from PIL import Image

    assert out["base_prompt"] == "a toy on the beach"
    assert [Image.open(p).size for p in out["images"]] == [(64, 48), (64, 48)]
