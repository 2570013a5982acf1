#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install megasail into it, C++ extension
# included. Sourced by examples/quickstart.sh and tests/run.sh. Re-installs only when setup.py,
# pyproject.toml, the constraints or csrc/ change. MEGASAIL_VENV overrides the location (.venv);
# MEGASAIL_NO_INSTALL=1 uses the `python` on PATH as it is (tests, CI, containers) and installs nothing.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${MEGASAIL_NO_INSTALL:-}" ]; then
  if ! (cd "$repo" && python -c "import megasail._C, torch") 2>/dev/null; then
    echo "[setup] MEGASAIL_NO_INSTALL is set but $(command -v python) cannot import megasail._C and torch:" \
         "unset it to create $repo/.venv, or install megasail into this environment" >&2
    return 1 2>/dev/null || exit 1
  fi
  return 0 2>/dev/null || exit 0
fi
venv="${MEGASAIL_VENV:-$repo/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.megasail-install-stamp"
want="$(cd "$repo" && cat setup.py pyproject.toml constraints-cpu.txt csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] || ! python -c "import megasail._C" 2>/dev/null; then
  echo "[setup] installing megasail and its test dependencies into $venv (first run: a few minutes)"
  python -m pip install -q --upgrade pip
  # constraints-cpu.txt pins the CPU torch wheel; without it pip would fetch a multi-GB CUDA build
  (cd "$repo" && python -m pip install -q -c constraints-cpu.txt -e ".[dev]")
  echo "$want" > "$stamp"
fi
