"""Bad input to the command line, as a table: each case runs `python -m dco_train ...` in a subprocess
and must end with a non-zero exit, a message that names the flag or file and says what to do, no
traceback, nothing left in the output folder, and within a bounded time (every case here fails
before a model is loaded, so it takes about as long as importing torch)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import REPO, write_images

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SECONDS = 45  # an import of torch and diffusers plus the checks; a model load would exceed it on a busy CPU


@dataclass
class Case:
    id: str
    args: list[str]  # {model}, {data}, {out}, {root} are filled in
    says: tuple[str, ...]  # all must appear in stderr: the flag or file, and the way to fix it
    setup: str = ""  # name of a set-up step below


def _lines(*s: str) -> tuple[str, ...]:
    return s


TRAIN = ["train", "--pretrained_model_name_or_path={model}", "--output_dir={out}"]
SUBJECT = [*TRAIN, "--data_dir={data}", "--tokens", "<obj>=toy", "--preset", "subject"]
SAMPLE = ["sample", "--pretrained_model_name_or_path={model}", "--output_dir={out}", "--prompt", "a toy"]

CASES = [
    Case(
        "train-missing-dataset",
        [*TRAIN, "--data_dir={root}/no_such_folder"],
        _lines("no_such_folder", "does not exist"),
    ),
    Case(
        "train-empty-dataset",
        [*TRAIN, "--data_dir={root}/empty"],
        _lines("empty", "has no images", "put the training"),
        setup="empty",
    ),
    Case("train-no-dataset", TRAIN, _lines("data_dir", "config_dir")),
    Case("train-resolution-not-multiple-of-8", [*SUBJECT, "--resolution=17"], _lines("resolution", "multiple of 8")),
    Case("train-resolution-not-a-number", [*SUBJECT, "--resolution=big"], _lines("--resolution", "invalid int")),
    Case("train-bad-preset", [*TRAIN, "--data_dir={data}", "--preset", "bogus"], _lines("--preset", "choose from")),
    Case(
        "train-token-with-space",
        [*TRAIN, "--data_dir={data}", "--tokens", "my dog=dog"],
        _lines("--tokens", "<token>=word"),
    ),
    Case(
        "train-token-listed-twice",
        [*TRAIN, "--data_dir={data}", "--tokens", "<a>=x,<a>=y"],
        _lines("--tokens", "<a>", "twice"),
    ),
    Case(
        "train-subject-without-tokens",
        [*TRAIN, "--data_dir={data}", "--preset", "subject"],
        _lines("tokens", "<dog>=dog"),
    ),
    Case(
        "train-caption-without-token",
        [*TRAIN, "--data_dir={data}", "--tokens", "<hat>=hat", "--preset", "subject"],
        _lines("<hat>", "every caption must name"),
    ),
    Case("train-negative-steps", [*SUBJECT, "--max_train_steps=-3"], _lines("max_train_steps", "at least 1")),
    Case("train-zero-learning-rate", [*SUBJECT, "--learning_rate=0"], _lines("learning_rate", "greater than 0")),
    Case("train-bad-lr-scheduler", [*SUBJECT, "--lr_scheduler=sometimes"], _lines("lr_scheduler", "one of")),
    Case(
        "train-output-holds-a-run",
        SUBJECT,
        _lines("already holds a run", "--overwrite", "--resume_from_checkpoint"),
        setup="finished_run",
    ),
    Case(
        "train-read-only-output",
        [*SUBJECT[:2], "--output_dir=/sys/dco-bad-input-test", *SUBJECT[3:]],
        _lines("--output_dir", "/sys/dco-bad-input-test", "choose a folder you can write to"),
    ),
    Case(
        "train-output-under-a-file",
        [*SUBJECT[:2], "--output_dir={root}/a_file/out", *SUBJECT[3:]],
        _lines("--output_dir", "a_file", "choose a folder you can write to"),
        setup="a_file",
    ),
    Case(
        "train-model-path-typo",
        [
            "train",
            "--pretrained_model_name_or_path={root}/tiny-sdxll",
            "--output_dir={out}",
            "--data_dir={data}",
            "--tokens",
            "<obj>=toy",
            "--preset",
            "subject",
        ],
        _lines("tiny-sdxll", "does not exist", "Did you mean", "tiny-sdxl"),
        setup="model_link",
    ),
    Case(
        "train-relative-typo-is-not-a-hub-id",
        [
            "train",
            "--pretrained_model_name_or_path=models/sdxll",
            "--output_dir={out}",
            "--data_dir={data}",
            "--tokens",
            "<obj>=toy",
            "--preset",
            "subject",
        ],
        _lines("models/sdxll", "does not exist", "not a hub id"),
        setup="models_folder",
    ),
    Case(
        "train-model-folder-not-sdxl",
        [
            "train",
            "--pretrained_model_name_or_path={data}",
            "--output_dir={out}",
            "--data_dir={data}",
            "--tokens",
            "<obj>=toy",
            "--preset",
            "subject",
        ],
        _lines("--pretrained_model_name_or_path", "unet/", "diffusers SDXL folder"),
    ),
    Case(
        "train-pickled-checkpoint",
        [
            "train",
            "--pretrained_model_name_or_path={root}/model.ckpt",
            "--output_dir={out}",
            "--data_dir={data}",
            "--tokens",
            "<obj>=toy",
            "--preset",
            "subject",
        ],
        _lines("model.ckpt", ".safetensors"),
        setup="ckpt",
    ),
    Case(
        "train-resume-missing-checkpoint",
        [*SUBJECT, "--resume_from_checkpoint", "checkpoint-99"],
        _lines("checkpoint-99", "'latest'"),
    ),
    Case(
        "train-missing-tokenizer-dir",
        [*SUBJECT, "--tokenizer_dir={root}/nope"],
        _lines("--tokenizer_dir", "vocab.json"),
    ),
    Case("sample-bad-scheduler", [*SAMPLE, "--scheduler", "eulr"], _lines("eulr", "euler")),
    Case("sample-negative-steps", [*SAMPLE, "--steps", "-1"], _lines("steps", "at least 1")),
    Case("sample-width-not-multiple-of-8", [*SAMPLE, "--width", "100"], _lines("width", "multiples of 8")),
    Case("sample-missing-lora", [*SAMPLE, "--lora", "{root}/dog.safetensors:0.8"], _lines("--lora", "dog.safetensors")),
    Case(
        "sample-damaged-lora",
        [*SAMPLE, "--lora", "{root}/broken.safetensors"],
        _lines("--lora", "broken.safetensors", "not a valid safetensors", "write it again"),
        setup="broken",
    ),
    Case("sample-lora-folder-without-lora", [*SAMPLE, "--lora", "{data}"], _lines("holds none of", "give the file")),
    Case("sample-token-without-embeddings", [*SAMPLE[:-1], "a <dog> on the beach"], _lines("<dog>", "--embeddings")),
    Case(
        "sample-missing-embeddings",
        [*SAMPLE[:-1], "a <dog>", "--embeddings", "{root}/emb.safetensors"],
        _lines("--embeddings", "emb.safetensors", "does not exist"),
    ),
    Case(
        "sample-read-only-output",
        [
            "sample",
            "--pretrained_model_name_or_path={model}",
            "--prompt",
            "a toy",
            "--output_dir=/sys/dco-bad-input-test",
        ],
        _lines("--output_dir", "choose a folder you can write to"),
    ),
    Case("demo-zero-steps", ["demo", "--output", "{out}", "--steps", "0"], _lines("--steps", "at least 1")),
    Case("demo-output-is-a-file", ["demo", "--output", "{root}/a_file"], _lines("--output", "a_file"), setup="a_file"),
    Case(
        "tiny-model-output-not-empty", ["tiny-model", "--output", "{data}"], _lines("--output", "not an empty folder")
    ),
]


def _setup(kind: str, root: Path, out: Path, model: Path, data: Path) -> None:
    if kind == "empty":
        (root / "empty").mkdir()
    elif kind == "a_file":
        (root / "a_file").write_text("not a folder")
    elif kind == "model_link":
        (root / "tiny-sdxl").symlink_to(model, target_is_directory=True)
    elif kind == "models_folder":
        (root / "models").mkdir()
    elif kind == "ckpt":
        (root / "model.ckpt").write_bytes(b"\x80\x02pickle")
    elif kind == "broken":
        (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{cut short")
    elif kind == "finished_run":
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"earlier run")


def _files(folder: Path) -> dict[str, bytes]:
    if not folder.exists() or not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("bad-inputs") / "data", ["a photo of a <obj>", "a <obj> in the snow"])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_message(case, tmp_path, tiny_model_dir, dataset):
    out = tmp_path / "out"
    _setup(case.setup, tmp_path, out, tiny_model_dir, dataset)
    before = _files(out)
    fill = {"model": str(tiny_model_dir), "data": str(dataset), "out": str(out), "root": str(tmp_path)}
    args = [a.format(**fill) for a in case.args]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dco_train", *args],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=SECONDS * 3,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for text in case.says:
        assert text in proc.stderr, f"{text!r} missing from: {proc.stderr[-1500:]}"
    assert _files(out) == before  # no partial file, an earlier run untouched
    assert elapsed < SECONDS, f"{case.id} took {elapsed:.0f} s"


def test_the_table_is_large_enough():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
    assert {c.args[0] for c in CASES} == {"train", "sample", "demo", "tiny-model"}
