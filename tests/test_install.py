"""The README's set-up installs the project: `dco-train` and `python -m dco_train` work from any folder.

The test makes a throwaway venv that sees this interpreter's packages (torch, diffusers, ...) through
a .pth file, runs the same `pip install -e .` the README's set-up runs (without network: no deps,
no build isolation), and calls both entry points from another working directory."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from helpers import REPO


def _venv_with_project(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "host-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "-e", str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


def test_editable_install_gives_both_entry_points_from_any_folder(tmp_path):
    venv = _venv_with_project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the install finds the package
    script = subprocess.run([str(venv / "bin" / "dco-train"), "--help"], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=120)
    assert script.returncode == 0, script.stderr[-2000:]
    assert "usage: dco-train" in script.stdout and "tiny-model" in script.stdout
    module = subprocess.run([str(venv / "bin" / "python"), "-m", "dco_train", "train", "--help"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert module.returncode == 0, module.stderr[-2000:]
    assert "--pretrained_model_name_or_path" in module.stdout
    top_level = next((venv / "lib").glob("python*/site-packages/dco_sdxl-*.dist-info/top_level.txt")).read_text().split()
    assert top_level == ["dco_train"]  # the ComfyUI entry file __init__.py is not installed as a package


def test_readme_setup_installs_the_project():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.strip().splitlines() if line.strip()]
    assert len(commands) == 2, commands  # one runs the demo, one runs the test suite
    assert "-e ." in commands[0] and "dco_train demo" in commands[0]
    assert commands[1].strip() == "bash tests/run.sh"
    run_sh = (REPO / "tests" / "run.sh").read_text(encoding="utf-8")
    assert "-e ." in run_sh and "pyproject.toml" in run_sh.split("want=", 1)[1].splitlines()[0]
