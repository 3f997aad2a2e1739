"""The command line: the reference README's commands, the demo, single files, two processes."""

import json
import os
import subprocess
import sys
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


def test_demo_writes_every_file(tmp_path):
    s = summary(cli("demo", "--output", str(tmp_path / "demo"), timeout=600))
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
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "embeddings.safetensors", "metrics.jsonl", "per_image.json",
                                                    "pytorch_lora_weights.safetensors"]
    assert all(k.startswith("lora_unet_") for k in load_lora(s["lora"]).modules["unet"])
    from dco_train.checkpoint import load_checkpoint

    ck = load_checkpoint(out / "checkpoints/checkpoint-2")
    assert len(ck.rng) == 2 and not torch.equal(ck.rng[0], ck.rng[1])  # one generator per process
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 3


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


# ---------------------------------------------------------------------------------- help text
def _subparsers():
    import argparse

    from dco_train.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser, **action.choices}


@pytest.mark.parametrize("command", ["", "train", "sample", "demo", "tiny-model"])
def test_every_subcommand_help_prints_and_every_option_has_help(command, capsys):
    from dco_train.cli import main

    with pytest.raises(SystemExit) as exc:
        main([command, "--help"] if command else ["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text
    parser = _subparsers()[command]
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            flag = action.option_strings[0]
            assert action.help and len(action.help) > 15, f"{command} {flag} has no help"
            assert flag in text
            if not (action.required or action.const is True or action.nargs == 0):
                assert "default" in action.help, f"{command} {flag} does not state its default"
            assert "empty means" not in action.help and "DESIGN" not in action.help, flag


def test_tokens_help_shows_the_syntax_the_cli_takes():
    from dco_train.config import parse_tokens

    help_text = next(a.help for a in _subparsers()["train"]._actions if a.dest == "tokens")
    assert '"<dog>=dog"' in help_text and "{" not in help_text
    assert parse_tokens("<dog>=dog") == {"<dog>": "dog"}


# ---------------------------------------------------------------------------------- tiny model end to end
def test_tiny_model_command_then_train_and_sample(tmp_path, subject_dir):
    model = tmp_path / "tiny"
    s = summary(cli("tiny-model", "--output", str(model), cwd=tmp_path))
    assert (model / "unet").is_dir() and s["model"] == str(model)
    t = summary(cli("train", f"--pretrained_model_name_or_path={model}", f"--data_dir={subject_dir}", "--tokens",
                    "<obj>=toy", "--preset", "subject", f"--output_dir={tmp_path / 'out' / 'dog'}", "--rank=4", *SHRINK,
                    cwd=tmp_path))  # out/ does not exist: the parents are created
    assert Path(t["lora"]).name == "pytorch_lora_weights.safetensors"
    proc = cli("sample", f"--pretrained_model_name_or_path={model}", "--lora", str(tmp_path / "out" / "dog"),
               "--embeddings", str(tmp_path / "out" / "dog"), "--prompt", "a <obj> on the beach", "--width", "64",
               "--height", "64", "--steps", "2", "--output_dir", str(tmp_path / "samples"), cwd=tmp_path)
    out = summary(proc)
    assert len(out["images"]) == 1 and Path(out["images"][0]).is_file()
    assert "sampling" in proc.stderr and f"Wrote 1 image: {out['images'][0]}" in proc.stderr


def test_tiny_model_single_file_trains(tmp_path, style_dir):
    s = summary(cli("tiny-model", "--output", str(tmp_path / "tiny"), "--single-file"))
    assert Path(s["model"]).suffix == ".safetensors"
    t = summary(cli("train", f"--pretrained_model_name_or_path={s['model']}", f"--tokenizer_dir={s['tokenizer_dir']}",
                    f"--data_dir={style_dir}", "--preset", "style", "--rank=4", f"--output_dir={tmp_path / 'o'}",
                    "--max_train_steps=1", "--resolution=64", "--no_progress"))
    assert Path(t["lora"]).is_file()


# ---------------------------------------------------------------------------------- the output folder
def test_output_folder_with_a_run_is_refused_unless_overwrite_or_resume(tiny_model_dir, style_dir, tmp_path):
    out = tmp_path / "o"
    args = ["train", f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_dir={style_dir}", "--preset",
            "style", "--rank=4", f"--output_dir={out}", *SHRINK]
    first = summary(cli(*args))
    before = Path(first["lora"]).read_bytes()
    again = cli(*args)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--overwrite" in again.stderr
    assert Path(first["lora"]).read_bytes() == before
    latest = cli(*args, "--resume_from_checkpoint", "latest")  # no checkpoint to resume: still guarded, and said
    assert latest.returncode == 2 and "holds no checkpoint yet" in latest.stderr and "already holds a run" in latest.stderr
    bad = cli(*args, "--overwrite", f"--data_dir={tmp_path / 'missing'}")  # validated before anything is deleted
    assert bad.returncode == 2 and Path(first["lora"]).read_bytes() == before
    assert summary(cli(*args, "--overwrite", "--seed=3"))["step"] == 2


def test_run_folder_guard_rules(tmp_path):
    from dco_train.errors import DCOError
    from dco_train.outputs import clear_run, guard_run_folder

    assert guard_run_folder(tmp_path / "new", resume=None, overwrite=False) == []
    (tmp_path / "checkpoints" / "checkpoint-5").mkdir(parents=True)  # a partial run
    with pytest.raises(DCOError, match="already holds a run \\(checkpoints\\)"):
        guard_run_folder(tmp_path, resume=None, overwrite=False)
    assert guard_run_folder(tmp_path, resume="latest", overwrite=False) == []
    (tmp_path / "dog.safetensors").write_bytes(b"x")
    doomed = guard_run_folder(tmp_path, resume=None, overwrite=True, extra=[tmp_path / "dog.safetensors"])
    assert {p.name for p in doomed} == {"checkpoints", "dog.safetensors"}
    (tmp_path / "keep.png").write_bytes(b"x")
    clear_run(doomed)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


# ---------------------------------------------------------------------------------- diffusers
def test_cli_output_folder_loads_with_diffusers_load_lora_weights(tiny_model_dir, style_dir, tmp_path, tokenizer_dir):
    from dco_train.tiny import build_tiny_sdxl

    out = tmp_path / "o"
    s = summary(cli("train", f"--pretrained_model_name_or_path={tiny_model_dir}", f"--data_dir={style_dir}", "--preset",
                    "style", "--rank=4", "--learning_rate=1e-2", "--save_precision=fp32", f"--output_dir={out}", *SHRINK))
    pipe = build_tiny_sdxl(seed=0, tokenizer_dir=tokenizer_dir).pipeline()
    g = torch.Generator().manual_seed(0)
    x, c, p = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 128, generator=g), torch.randn(1, 64, generator=g)
    kw = dict(added_cond_kwargs={"text_embeds": p, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
    with torch.no_grad():
        before = pipe.unet(x, 500, c, **kw).sample
        pipe.load_lora_weights(str(out))  # the folder as it is, the reference README's form
        after = pipe.unet(x, 500, c, **kw).sample
    n_lora = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("lora_A"))
    assert n_lora == len(load_lora(s["lora"]).modules["unet"])
    assert (after - before).abs().max().item() > 1e-6


# ---------------------------------------------------------------------------------- Ctrl-C
def test_second_ctrl_c_stops_with_a_message(tiny_model_dir, style_dir, tmp_path):
    import signal

    cmd = [sys.executable, "-m", "dco_train", "train", f"--pretrained_model_name_or_path={tiny_model_dir}",
           f"--data_dir={style_dir}", "--preset", "style", "--rank=4", f"--output_dir={tmp_path / 'o'}",
           "--max_train_steps=100000", "--resolution=256", "--no_progress", "--checkpointing_steps=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "Training" in line:
                break
        proc.send_signal(signal.SIGINT)
        for line in proc.stderr:  # two signals sent at once would arrive as one
            if "Ctrl-C again" in line:
                break
        proc.send_signal(signal.SIGINT)  # a 256 px step takes long enough that this lands inside it
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Interrupted: stopped at once" in err
