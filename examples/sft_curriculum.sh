#!/usr/bin/env bash
# SAIL-VL's SFT curriculum: SFT-Knowledge, SFT-Instruction, SFT-Preference (examples/configs/stages/),
# all modules training, on one node.
#
#   bash examples/sft_curriculum.sh --model 2b --init runs/pretrain_655b_2b/checkpoints      # one run, 3 stages
#   bash examples/sft_curriculum.sh --model 2b --init CKPT --chained    # one run per stage, each from the
#                                                                        # previous stage's weights
#   bash examples/sft_curriculum.sh --model tiny --synthetic runs/sft_synth --budget-samples 24   # CPU smoke run
#
# curriculum (default): one pretrain_vlm.py run whose loader moves through the three stages; the trainer
#   rebuilds optimizer and schedule at each switch; resumable as a whole (checkpoint.load = save).
# --chained: three runs; stage k starts from stage k-1's final weights (the stage's init_checkpoint:
#   weights only, fresh optimizer, schedule and data position) and saves to RUN_DIR/<stage>; each run
#   resumes its own checkpoint when restarted.
#
# Options: --model tiny|2b|8b (default 2b), --nproc N (processes on this node; default: GPUs, else 2),
#   --init CKPT (weights the first stage starts from, e.g. the pretraining checkpoint), --run-dir DIR
#   (default runs/sft_<model>), --synthetic DIR (make synthetic chat data there if missing and point every
#   stage at it), --budget-samples N (every stage's budget: smoke runs), --dry-run (print the plan / the
#   commands only), -- OVERRIDES (config overrides for every run). Stage source prefixes in the stage files
#   are placeholders: point them at your preprocessed SFT data (tools/preprocess_data.py --template ...).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
model=2b nproc="" init="" run_dir="" synthetic="" budget="" chained=0 dry_run=0 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    --init) init="$2"; shift 2 ;;
    --run-dir) run_dir="$2"; shift 2 ;;
    --synthetic) synthetic="$2"; shift 2 ;;
    --budget-samples) budget="$2"; shift 2 ;;
    --chained) chained=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "sft_curriculum.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
python=python3; [ -x "$repo/.venv/bin/python" ] && [ -z "${MEGASAIL_NO_INSTALL:-}" ] && python="$repo/.venv/bin/python"
if [ -z "$nproc" ]; then
  nproc="$("$python" -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
run_dir="${run_dir:-runs/sft_$model}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
settings=()
case "$model" in
  2b) config=examples/configs/sail_vl_2b.yaml
      settings=(data.seq_length=8192 data.global_batch_size=128 optim.lr=2e-5 optim.min_lr=0 optim.warmup_fraction=0.03) ;;
  8b) config=examples/configs/sail_vl_8b.yaml
      settings=(data.seq_length=8192 data.global_batch_size=128 optim.lr=1e-5 optim.min_lr=0 optim.warmup_fraction=0.03) ;;
  tiny) config=examples/configs/tiny.yaml ;;
  *) echo "sft_curriculum.sh: --model must be tiny, 2b or 8b, got '$model'" >&2; exit 2 ;;
esac
sources=()
if [ -n "$synthetic" ]; then
  if [ ! -f "$synthetic/sft.manifest.json" ]; then
    "$python" tools/make_synthetic_data.py --output "$synthetic/raw" --samples 400 --seed 1
    # a chat template renders each caption as a one-turn chat with the picture as the question
    "$python" tools/preprocess_data.py --input "$synthetic/raw/captions.jsonl" --tokenizer "$synthetic/raw/tokenizer" \
      --caption-template sailvl-chat --max-tiles 1 --max-seq-length 1024 --output-prefix "$synthetic/sft" \
      --overwrite --no-progress
  fi
  sources=(--all-sources "$synthetic/sft")
  # the 128-piece synthetic tokenizer padded for TP <= 2 (tiny.yaml keeps Qwen2.5's vocabulary); the
  # image token and pad ids come from the dataset manifest at start-up
  settings+=(model.language.vocab_size=256 data.seq_length=1024 data.max_tiles=1)
fi
[ -n "$budget" ] && sources+=(--budget-samples "$budget")
stage_files=(sft_knowledge sft_instruction sft_preference)
plan_args=(--gpus-per-node "$nproc" --model-name "SAIL-VL-${model^^} SFT")
[ "$model" = tiny ] && plan_args+=(--no-plan)  # a plan at GPU MFU means nothing for the CPU model

compose() {  # compose OUT.yaml INIT STAGE...: the config one pretrain_vlm.py run reads
  local out="$1" first_init="$2"; shift 2
  local stages=() s
  for s in "$@"; do stages+=(--stage "examples/configs/stages/$s.yaml"); done
  "$python" -m megasail.plan --config "$config" "${stages[@]}" "${sources[@]}" "${plan_args[@]}" \
    ${first_init:+--init-checkpoint "$first_init"} --write-config "$out" \
    "${settings[@]}" logging.wandb=false "${extra[@]}"
}
train() {  # train CONFIG SAVE_DIR
  local cmd=("$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc" pretrain_vlm.py
             --config "$1" checkpoint.save="$2" checkpoint.load="$2" logging.dir="$2")
  echo "[sft] ${cmd[*]}"
  [ "$dry_run" = 1 ] || "${cmd[@]}"
}

mkdir -p "$run_dir"
if [ "$chained" = 0 ]; then
  compose "$run_dir/config.yaml" "$init" "${stage_files[@]}"
  train "$run_dir/config.yaml" "$run_dir/checkpoints"
else
  previous="$init"
  for s in "${stage_files[@]}"; do
    echo "[sft] stage $s${previous:+ from the weights of $previous}"
    compose "$run_dir/$s.yaml" "$previous" "$s"
    train "$run_dir/$s.yaml" "$run_dir/$s"
    previous="$run_dir/$s"
  done
fi
