#!/usr/bin/env bash
# The tiny end-to-end demo: set up .venv, then one training step of the tiny SAIL-VL model with
# tensor parallel 2 over two local processes (gloo on CPU, nccl on GPU). Prints loss and parameter counts.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/tools/setup_venv.sh"
cd "$repo"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
torchrun --standalone --nproc-per-node 2 examples/forward_backward.py \
  --config examples/configs/tiny.yaml parallel.tensor=2 "$@"
