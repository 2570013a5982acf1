#!/usr/bin/env bash
# The first GPU run in one command (under 8 minutes on one H100/H200):
#   1. pytest -m gpu: Transformer Engine init and key names, TE weights equal to the local spec's, THD
#      packing, an FP8 step, stage switches with overlapped grad reduce and param gather, async saves,
#      DALI `mixed` decode in spawned loader workers against PIL per tile
#   2. tools/bench_train.py: the SAIL-VL-2B config at TP=1, bf16 and (with TE) FP8, a few steps:
#      tokens/s, TFLOP/s per GPU, MFU, the memory estimate of megasail.models.memory beside the peak
#   3. tools/bench_images.py: DALI `mixed` against the CPU backends, tiles/s
# then prints one markdown table and exits non-zero when anything failed. Without CUDA it prints one line
# and exits 0 (CI runs that path).
#
#   bash tools/gpu_check.sh                 # everything
#   GPU_CHECK_OUT=dir bash tools/gpu_check.sh   # keep the logs and JSON there (default: a temp dir)
# Uses .venv when it exists (tools/setup_venv.sh), else the python on PATH (an NGC container's).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python=python3
[ -x "$repo/.venv/bin/python" ] && python="$repo/.venv/bin/python"
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible to torch: skipped"
  exit 0
fi
out="${GPU_CHECK_OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$out"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
failed=0
rows=()

timed() {  # timed NAME LOG CMD...: run, record seconds and status
  local name="$1" log="$2" start end status
  shift 2
  start=$(date +%s)
  if "$@" >"$log" 2>&1; then status=pass; else status=FAIL; failed=1; fi
  end=$(date +%s)
  echo "$status $((end - start))"
}

device="$("$python" -c 'import torch; print(torch.cuda.get_device_name())')"
have_te="$("$python" -c 'import importlib.util as u; print("yes" if u.find_spec("transformer_engine") else "no")')"
echo "gpu_check: $device, Transformer Engine: $have_te; logs in $out"

read -r status secs < <(timed pytest "$out/pytest.log" "$python" -m pytest -m gpu -q -p no:cacheprovider tests)
summary="$(tail -n 1 "$out/pytest.log")"
rows+=("| pytest -m gpu | $status | ${secs}s | $summary |")

layouts="tp=1"
[ "$have_te" = yes ] && layouts="tp=1;tp=1,fp8"
read -r status secs < <(timed bench_train "$out/bench_train.log" "$python" tools/bench_train.py \
  --config examples/configs/sail_vl_2b.yaml --nproc 1 --layouts "$layouts" --steps 4 --warmup 2 \
  --json "$out/bench_train.json" data.seq_length=8192 data.global_batch_size=2 data.micro_batch_size=1 \
  train.recompute=selective)
if [ "$status" = pass ]; then
  while IFS= read -r line; do rows+=("$line"); done < <("$python" - "$out/bench_train.json" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
for r in data["rows"] if isinstance(data, dict) else data:
    if r.get("model") != "sailvl":
        continue
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    layout = f"TP={r.get('tp')} {'FP8' if r.get('fp8') else 'bf16'}"
    print(f"| bench_train 2B {layout} | pass | {fmt(r.get('step_s'), '.2f')} s/step | "
          f"{fmt(r.get('tokens_per_s'), ',.0f')} tokens/s, {fmt(r.get('tflops_per_device'), '.0f')} TFLOP/s/GPU, "
          f"MFU {fmt(r.get('mfu'), '.1%')}, memory estimated {fmt(r.get('est_mem_gib'), '.1f')} GiB / peak "
          f"{fmt(r.get('mem_gb') and r['mem_gb'] * 1e9 / 2**30, '.1f')} GiB |")
EOF
)
else
  rows+=("| bench_train 2B | FAIL | ${secs}s | see $out/bench_train.log |")
fi

read -r status secs < <(timed bench_images "$out/bench_images.log" "$python" tools/bench_images.py \
  --max-tiles 6,12 --windows 3 --json "$out/bench_images.json")
if [ "$status" = pass ]; then
  while IFS= read -r line; do rows+=("$line"); done < <("$python" - "$out/bench_images.json" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1])):
    print(f"| bench_images {r['images']} max {r['max_tiles']} {r['backend']} | pass | | "
          f"{r['tiles_per_s']:,.0f} tiles/s ({r['tiles_per_cpu_s']:,.0f} per CPU-s) |")
EOF
)
else
  rows+=("| bench_images | FAIL | ${secs}s | see $out/bench_images.log |")
fi

echo
echo "GPU check on $device ($(date -u +%Y-%m-%d))"
echo
echo "| check | status | time | result |"
echo "| --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
exit "$failed"
