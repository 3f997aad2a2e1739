#!/usr/bin/env bash
# Run the ComfyUI tests under ComfyUI's own venv python (ComfyUI's dependencies live there).
#
#   tests/comfy/run.sh [pytest args]                          # ComfyUI at ~/ComfyUI
#   COMFYUI_PATH=~/ComfyUI-0.3.64 tests/comfy/run.sh -q       # another version
#
# That venv also needs the pack's own dependencies and pytest:
#   $COMFYUI_PATH/.venv/bin/pip install pytest diffusers peft accelerate safetensors
# (keep its torch: add `-c <(echo torch==<its version>)`).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
COMFY="${COMFYUI_PATH:-$HOME/ComfyUI}"
PY="$COMFY/.venv/bin/python"
if [ ! -x "$PY" ]; then
  echo "tests/comfy: skipped, no ComfyUI venv at $PY (set COMFYUI_PATH)" >&2
  exit 0
fi
if ! "$PY" -c "import pytest" 2>/dev/null; then
  echo "tests/comfy: $PY has no pytest; install it with: $COMFY/.venv/bin/pip install pytest" >&2
  exit 1
fi
cd "$ROOT"
export COMFYUI_PATH="$COMFY"
# the whole folder unless test paths are given
for arg in "$@"; do
  case "$arg" in tests/*) exec "$PY" -m pytest -p no:cacheprovider "$@" ;; esac
done
exec "$PY" -m pytest -p no:cacheprovider tests/comfy "$@"
