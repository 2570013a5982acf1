#!/usr/bin/env bash
#SBATCH --job-name=sailvl-pretrain
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=7-00:00:00
#SBATCH --output=logs/%x-%j.out
#
# SAIL-VL pretraining, 655B tokens in one resumable run: Pretrain-Alignment (131B tokens, the projector
# trains, ViT and LLM frozen) then Pretrain-Advance (524B tokens, the ViT unlocked), stages from
# examples/configs/stages/. Prints the plan (GPUs, layout, tokens per step, iterations per stage,
# estimated days: each stage's own FLOPs per step at one MFU, or a measured tokens/s) before it starts.
#
#   MODEL=2b sbatch --nodes 16 examples/pretrain_655b.sh                 # or MODEL=8b
#   bash examples/pretrain_655b.sh --dry-run --model 8b --nodes 32     # the plan only, anywhere
#   sbatch examples/pretrain_655b.sh -- optim.lr=2e-4 data.num_workers=8  # extra overrides after --
#
# Settings (flag or environment variable; flags win):
#   --model 2b|8b            MODEL                 SAIL-VL-2B (TP=1) or SAIL-VL-8B (TP=4)
#   --nodes N                NODES                 default: SLURM_JOB_NUM_NODES, else 16
#   --gpus-per-node N        GPUS_PER_NODE         default 8
#   --mfu X                  MFU                   share of the GPU's dense peak every stage runs at (default 0.35):
#                                                  a stage's time is its own FLOPs per step (megasail.models.flops)
#   --gpu NAME               GPU                   H100-SXM (default), H100-PCIe, H100-NVL, H200, H200-NVL, B200,
#                                                  GB200, A100: whose bf16/FP8 peaks the MFU applies to
#   --tokens-per-s-per-gpu X TOKENS_PER_S_PER_GPU  instead of --mfu: measured sample tokens/s per GPU
#                                                  (tools/bench_train.py), one figure for every stage
#   --run-dir DIR            RUN_DIR               checkpoints, metrics, composed config (default runs/pretrain_655b_MODEL)
#   --dry-run                                      print the plan and the launch command, start nothing
# Stage source prefixes in the stage files are placeholders: point them at your preprocessed data.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/examples/pretrain_655b.sh" ] && repo="$SLURM_SUBMIT_DIR"
model="${MODEL:-2b}" nodes="${NODES:-${SLURM_JOB_NUM_NODES:-16}}" gpus="${GPUS_PER_NODE:-8}"
tps="${TOKENS_PER_S_PER_GPU:-}" mfu="${MFU:-0.35}" gpu="${GPU:-H100-SXM}" run_dir="${RUN_DIR:-}" dry_run=0 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --tokens-per-s-per-gpu) tps="$2"; shift 2 ;;
    --mfu) mfu="$2"; shift 2 ;;
    --gpu) gpu="$2"; shift 2 ;;
    --run-dir) run_dir="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '/^# SAIL-VL pretraining/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "pretrain_655b.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$model" in
  2b) config=examples/configs/sail_vl_2b.yaml; layout=(parallel.tensor=1 parallel.pipeline=1) ;;
  8b) config=examples/configs/sail_vl_8b.yaml; layout=(parallel.tensor=4 parallel.pipeline=1) ;;
  *) echo "pretrain_655b.sh: --model must be 2b or 8b, got '$model'" >&2; exit 2 ;;
esac
run_dir="${run_dir:-runs/pretrain_655b_$model}"
recipe=(data.seq_length=8192 data.global_batch_size=512 data.micro_batch_size=1 data.max_tiles=12
        "${layout[@]}" optim.lr=1e-4 optim.min_lr=1e-5 optim.warmup_steps=500 optim.schedule=cosine
        train.recompute=selective checkpoint.save="$run_dir/checkpoints" checkpoint.load="$run_dir/checkpoints"
        checkpoint.interval=1000 logging.dir="$run_dir")
stages=(--stage examples/configs/stages/pretrain_alignment.yaml --stage examples/configs/stages/pretrain_advance.yaml)

cd "$repo"
python=python3; [ -x "$repo/.venv/bin/python" ] && [ -z "${MEGASAIL_SYSTEM_PYTHON:-}" ] && python="$repo/.venv/bin/python"
compose=("$python" -m megasail.plan --config "$config" "${stages[@]}" --nodes "$nodes" --gpus-per-node "$gpus"
         --model-name "SAIL-VL-${model^^}" --mfu "$mfu" --gpu "$gpu" ${tps:+--tokens-per-s-per-gpu "$tps"}
         "${recipe[@]}" "${extra[@]}")
launch=(torchrun --nnodes "$nodes" --nproc-per-node "$gpus" --rdzv-backend c10d
        --rdzv-endpoint "\${MASTER_ADDR}:29500" --rdzv-id "\${SLURM_JOB_ID}"
        pretrain_vlm.py --config "$run_dir/config.yaml")
if [ "$dry_run" = 1 ]; then
  "${compose[@]}"
  echo
  echo "launch (per node, under srun): ${launch[*]}"
  exit 0
fi
mkdir -p "$run_dir" logs
"${compose[@]}" --write-config "$run_dir/config.yaml"   # the plan and the run read the same composed config
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "pretrain_655b.sh: not inside a Slurm job; submit with sbatch, or use --dry-run for the plan" >&2
  exit 2
fi
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_ADDR OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" CUDA_DEVICE_MAX_CONNECTIONS=1
# one torchrun per node; it starts the node's GPU processes and rendezvouses through c10d
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  torchrun --nnodes "$nodes" --nproc-per-node "$gpus" --rdzv-backend c10d \
  --rdzv-endpoint "$MASTER_ADDR:29500" --rdzv-id "$SLURM_JOB_ID" \
  pretrain_vlm.py --config "$run_dir/config.yaml"
