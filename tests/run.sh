#!/usr/bin/env bash
# The whole test suite, from a fresh clone: `bash tests/run.sh [pytest args]`.
#
# 1. Builds .venv on first use (the CPU build of torch 2.13.0 from this machine's disk, the
#    runtime requirements, pytest, ruff, and the project itself with `pip install -e .`, so
#    `dco-train` and `python -m dco_train` work from any folder) and re-installs only when a
#    requirements file or pyproject.toml changes.
# 2. Lints with ruff (configured in pyproject.toml); a finding fails the run.
# 3. Runs the engine tests with pytest. pytest's exit code 5 ("no tests ran") is a broken set-up,
#    so it fails the run.
# 4. Runs the frontend's JS unit tests with node's built-in runner (tests/js), when present.
# 5. Runs the real-ComfyUI tests under ComfyUI's own python (tests/comfy/run.sh) when a ComfyUI
#    checkout is found at $COMFYUI_PATH or ~/ComfyUI; otherwise they are skipped with a reason.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV" || exit 1
fi
want="$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VENV/.requirements-stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/pip" install -q -r requirements-test.txt -e . || { echo "tests/run.sh: pip install failed" >&2; exit 1; }
  echo "$want" > "$VENV/.requirements-stamp"
fi

status=0
"$VENV/bin/python" -m ruff check . || { echo "tests/run.sh: ruff found problems (see above)" >&2; status=1; }
"$VENV/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests; the test set-up is broken" >&2
  exit 1
fi
[ "$rc" -ne 0 ] && status=$rc

if [ -d tests/js ]; then
  if command -v node >/dev/null 2>&1; then
    node --test tests/js/ || status=1
  else
    echo "tests/run.sh: node is not installed; the JS unit tests cannot run" >&2
    status=1
  fi
fi

if [ -x tests/comfy/run.sh ] || [ -f tests/comfy/run.sh ]; then
  bash tests/comfy/run.sh -q || status=1
fi
exit $status
