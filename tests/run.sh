#!/usr/bin/env bash
# Set up (or reuse) .venv, then run the whole test suite. Extra arguments go to pytest,
# e.g. `bash tests/run.sh -m "not distributed" -x`.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/tools/setup_venv.sh"
cd "$repo"
python -m pytest -q "$@"
