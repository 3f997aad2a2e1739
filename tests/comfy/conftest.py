"""Tests against a real ComfyUI checkout ($COMFYUI_PATH, else ~/ComfyUI).

They need ComfyUI's own dependencies, so they run under ComfyUI's venv python
(`tests/comfy/run.sh`). Under any other Python, or without a checkout, every module here skips
itself with the reason (`harness.require()`), so the main suite stays green.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402


def pytest_report_header(config: pytest.Config) -> str:
    reason = harness.why_unavailable()
    if reason:
        return f"ComfyUI tests: skipped ({reason})"
    return f"ComfyUI tests: ComfyUI {harness.comfy_version()} at {harness.comfy_path()}"


@pytest.fixture(autouse=True)
def _unload_models():
    """Each test builds its own tiny models; drop them from ComfyUI's loaded-model list afterwards,
    or every later load walks (and garbage-collects) an ever longer list."""
    yield
    if harness.why_unavailable() is None:
        import comfy.model_management

        comfy.model_management.unload_all_models()
        comfy.model_management.cleanup_models()


@pytest.fixture
def folders(tmp_path):
    """Temporary loras / embeddings / output folders registered with ComfyUI."""
    import folder_paths

    loras, embs, out = tmp_path / "loras", tmp_path / "embeddings", tmp_path / "output"
    for p in (loras, embs, out):
        p.mkdir()
    saved_out = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(out))
    with harness.model_folder("loras", loras), harness.model_folder("embeddings", embs):
        yield {"loras": loras, "embeddings": embs, "output": out, "root": tmp_path}
    folder_paths.set_output_directory(saved_out)
