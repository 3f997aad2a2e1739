#!/usr/bin/env bash
# Run the ComfyUI tests under ComfyUI's own venv python (ComfyUI's dependencies live there).
#
#   tests/comfy/run.sh [pytest args]                          # ComfyUI at ~/ComfyUI
#   COMFYUI_PATH=~/ComfyUI-0.3.64 tests/comfy/run.sh -q       # another version
#
# That venv also needs the pack's own dependencies and pytest; they are installed on first use
# (its torch is kept).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
COMFY="${COMFYUI_PATH:-$HOME/ComfyUI}"
PY="$COMFY/.venv/bin/python"
if [ ! -x "$PY" ]; then
  echo "tests/comfy: skipped, no ComfyUI venv at $PY (set COMFYUI_PATH)" >&2
  exit 0
fi
if ! "$PY" -c "import pytest, diffusers, peft, accelerate, safetensors" 2>/dev/null; then
  # the pack's requirements (what ComfyUI-Manager would install) plus pytest, keeping ComfyUI's torch
  TORCH="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
  echo "tests/comfy: installing pytest and the pack's requirements into $COMFY/.venv (torch stays $TORCH)" >&2
  "$PY" -m pip install -q pytest -r "$ROOT/requirements.txt" -c <(echo "torch==$TORCH") || {
    echo "tests/comfy: could not install the test dependencies into $PY" >&2; exit 1; }
fi
cd "$ROOT"
export COMFYUI_PATH="$COMFY"
# the whole folder unless test paths are given
for arg in "$@"; do
  case "$arg" in tests/*) exec "$PY" -m pytest -p no:cacheprovider "$@" ;; esac
done
exec "$PY" -m pytest -p no:cacheprovider tests/comfy "$@"
