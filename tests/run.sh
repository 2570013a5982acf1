#!/usr/bin/env bash
# Set up (or reuse) .venv, then run the whole test suite on MEGASAIL_TEST_WORKERS pytest-xdist
# workers (2; 0 runs in one process, as `-s` needs). Extra arguments go to pytest,
# e.g. `bash tests/run.sh -m "not distributed" -x`.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/tools/setup_venv.sh"
cd "$repo"
workers="${MEGASAIL_TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then python -m pytest -q "$@"; else python -m pytest -q -n "$workers" "$@"; fi
