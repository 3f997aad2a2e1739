"""bench/sdxl_cpu_run.py's whole path (write an SGM file, convert, train through the CLI, check the
LoRA) on the tiny model, so the true-shape run's logic is checked in CI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "sdxl_cpu_run.py"


def _bench():
    spec = importlib.util.spec_from_file_location("sdxl_cpu_run", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_loads_every_key_and_covers_every_attention_projection(tmp_path, capsys):
    rc = _bench().main(["--tiny", "--resolution", "64", "--keep", str(tmp_path / "run")])
    lines = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines() if line and line[0] != "#")
    assert rc == 0, lines
    assert int(lines["sgm_keys_loaded"]) == int(lines["sgm_keys_total"]) > 100
    assert int(lines["lora_missing"]) == 0
    assert int(lines["lora_modules"]) == int(lines["sdxl_attention_projections"]) > 0
    assert (tmp_path / "run" / "run" / "pytorch_lora_weights.safetensors").is_file()


def test_true_shape_checkpoint_table_is_sdxl_base():
    """The meta-device table the true-shape run writes: SDXL base's parameter count and 560 projections."""
    bench = _bench()
    modules = bench.meta_modules(False, bench.CLIP_VOCAB, bench.CLIP_EOS)
    assert len(bench.attention_projections(modules[0])) == 560
    assert round(sum(p.numel() for p in modules[0].parameters()) / 1e9, 3) == pytest.approx(2.567, abs=0.001)
    shapes = bench.sgm_shapes(modules)
    assert shapes["conditioner.embedders.1.model.text_projection"] == (1280, 1280)
    assert shapes["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
