#!/usr/bin/env bash
# Choose SFT sources by probing, SAIL-VL style, and write the stage that trains the winners.
#
#   bash examples/curate_sft.sh                      # CPU demo: synthetic sources, tiny model (minutes)
#   bash examples/curate_sft.sh --config examples/configs/sail_vl_2b.yaml --init runs/pretrain/checkpoints \
#       --candidates sft_candidates.yaml --base-mixture examples/configs/stages/sft_knowledge.yaml \
#       --benchmark bench/textvqa.jsonl --benchmark bench/pope.jsonl --budget-samples 20000 --nproc 8
#
# 1. Probes the candidates in file order from --init's weights (tools/probe_sources.py --mode incremental):
#    each probe trains --budget-samples samples of the base mixture + the candidates kept so far + the next
#    one, and the candidate is kept when the benchmark average holds within --tolerance points.
# 2. Writes OUT/sft_curated.yaml (an examples/configs/stages/ stage file: the kept mixture) and prints the
#    pretrain_vlm.py command that trains it. The probe table is in OUT/probes/summary.json.
# Rerunning skips finished probes and resumes a cut one.
#
# Without --init/--candidates/--benchmark it runs the demo: colour questions about one-colour pictures
# (python -m megasail.curation.probe_demo): a base source, 'corrupted' (answers shuffled between pictures),
# 'good' (more correct data) and 'duplicate' (a copy of the base), a base checkpoint trained on the base
# source for 40 steps, and a 60-question benchmark. The corrupted source is dropped.
#
# Options: --out DIR (default runs/curate_sft), --config YAML (default examples/configs/tiny.yaml),
#   --init CKPT, --candidates YAML, --base-mixture STAGE.yaml, --benchmark FILE (repeatable),
#   --budget-samples N (per probe; demo default 48), --stage-budget-samples N (the written stage's budget;
#   default: the probes'), --tolerance POINTS (default 0), --mix F (default 0.5), --nproc N (processes per
#   probe; default 1), -- OVERRIDES (config overrides for every probe's training).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
out=runs/curate_sft config=examples/configs/tiny.yaml init="" candidates="" base_mixture="" budget=""
stage_budget="" tolerance=0 mix=0.5 nproc=1 benchmarks=() extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --init) init="$2"; shift 2 ;;
    --candidates) candidates="$2"; shift 2 ;;
    --base-mixture) base_mixture="$2"; shift 2 ;;
    --benchmark) benchmarks+=(--benchmark "$2"); shift 2 ;;
    --budget-samples) budget="$2"; shift 2 ;;
    --stage-budget-samples) stage_budget="$2"; shift 2 ;;
    --tolerance) tolerance="$2"; shift 2 ;;
    --mix) mix="$2"; shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "curate_sft.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
python=python3; [ -x "$repo/.venv/bin/python" ] && [ -z "${MEGASAIL_NO_INSTALL:-}" ] && python="$repo/.venv/bin/python"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
settings=()
if [ -z "$init" ] && [ -z "$candidates" ] && [ ${#benchmarks[@]} -eq 0 ]; then
  # the demo: sized for 2 CPU cores (one 448 px tile per picture, 1 ViT and 2 LLM layers, 4 samples a step)
  settings=(data.seq_length=320 data.global_batch_size=4 data.num_workers=0 data.max_tiles=1 data.pack_window=8
            data.pack_chunk_samples=32 model.vision.num_layers=1 model.language.num_layers=2
            optim.warmup_steps=0 logging.wandb=false)
  data="$out/data"
  echo "[curate] 1/3 synthetic sources and benchmark -> $data"
  "$python" -m megasail.curation.probe_demo --output "$data" >/dev/null
  init="$out/base_checkpoint" candidates="$data/candidates.yaml" base_mixture="$data/base.yaml"
  benchmarks=(--benchmark "$data/benchmark/colours.jsonl")
  budget="${budget:-48}"
  if ! "$python" -c "import sys; from megasail.checkpoint import latest_checkpoint as l; sys.exit(not l(sys.argv[1]))" "$init" 2>/dev/null; then
    echo "[curate] 2/3 base checkpoint: 40 steps on the base source -> $init"
    "$python" pretrain_vlm.py --config "$config" data.path="$data/sources/base" train.iters=40 "${settings[@]}" \
      optim.lr=5e-3 optim.min_lr=2e-3 checkpoint.save="$init" checkpoint.load="$init" logging.dir="$init" \
      > "$out/base_checkpoint.log" 2>&1 || { tail -20 "$out/base_checkpoint.log"; exit 1; }
  fi
  settings+=(optim.lr=1e-3 optim.min_lr=5e-4)  # fine-tuning a trained checkpoint: small steps, less order noise
  echo "[curate] 3/3 probing the candidates in order (tools/probe_sources.py --mode incremental)"
elif [ -z "$init" ] || [ -z "$candidates" ] || [ ${#benchmarks[@]} -eq 0 ]; then
  echo "curate_sft.sh: give --init, --candidates and --benchmark together (or none of them for the demo)" >&2
  exit 2
fi
[ -n "$budget" ] || { echo "curate_sft.sh: --budget-samples is required with your own candidates" >&2; exit 2; }
probe=("$python" tools/probe_sources.py --base-config "$config" --init "$init" --candidates "$candidates"
       "${benchmarks[@]}" --budget-samples "$budget" --mode incremental --out "$out/probes"
       --tolerance "$tolerance" --mix "$mix" --nproc-per-node "$nproc" --write-stage "$out/sft_curated.yaml"
       --eval-args="--max-new-tokens 8")
[ -n "$base_mixture" ] && probe+=(--base-mixture "$base_mixture")
[ -n "$stage_budget" ] && probe+=(--stage-budget-samples "$stage_budget")
"${probe[@]}" -- "${settings[@]}" "${extra[@]}"
