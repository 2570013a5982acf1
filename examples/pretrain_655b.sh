#!/usr/bin/env bash
#SBATCH --job-name=sailvl-pretrain
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=7-00:00:00
#SBATCH --signal=TERM@600
#SBATCH --output=logs/%x-%j.out
#
# SAIL-VL pretraining, 655B tokens in one resumable run: Pretrain-Alignment (131B tokens, the projector
# trains, ViT and LLM frozen) then Pretrain-Advance (524B tokens, the ViT unlocked), stages from
# examples/configs/stages/. Prints the plan (GPUs, layout, tokens per step, iterations per stage,
# estimated days: each stage's own FLOPs per step at one MFU, or a measured tokens/s; memory per GPU of
# every pipeline rank, flagged when it does not fit the GPU) before it starts.
# The recipe's values (batch, schedule, layout per model, stage files, plan defaults) are in
# examples/configs/recipes/pretrain_655b.yaml; this script adds the run directory and launches.
#
#   mkdir -p logs && MODEL=2b sbatch --nodes 16 examples/pretrain_655b.sh   # or MODEL=8b (Slurm writes logs/)
#   bash examples/pretrain_655b.sh --dry-run --model 8b --nodes 32     # the plan only, anywhere
#   sbatch examples/pretrain_655b.sh -- optim.lr=2e-4 data.num_workers=8  # extra overrides after --
#
# Ten minutes before the time limit Slurm sends SIGTERM to every rank (--signal=TERM@600): the trainer
# saves once and exits 0, and resubmitting the same command resumes from that save. The ranks are srun's
# tasks themselves (one per GPU), not children of torchrun, which kills its workers 30 s after its own
# SIGTERM, too soon for a large save.
#
# Settings (flag or environment variable; flags win; defaults from the recipe's plan:):
#   --model 2b|8b            MODEL                 SAIL-VL-2B (TP=1) or SAIL-VL-8B (TP=4)
#   --nodes N                NODES                 default: SLURM_JOB_NUM_NODES, else the recipe's (16)
#   --gpus-per-node N        GPUS_PER_NODE         default: the recipe's (8)
#   --mfu X                  MFU                   share of the GPU's dense peak every stage runs at (recipe: 0.35):
#                                                  a stage's time is its own FLOPs per step (megasail.models.flops)
#   --gpu NAME               GPU                   H100-SXM (recipe), H100-PCIe, H100-NVL, H200, H200-NVL, B200,
#                                                  GB200, A100: whose bf16/FP8 peaks the MFU applies to
#   --tokens-per-s-per-gpu X TOKENS_PER_S_PER_GPU  instead of --mfu: measured sample tokens/s per GPU
#                                                  (tools/bench_train.py), one figure for every stage
#   --from-metrics FILE      FROM_METRICS          instead of --mfu: a run's metrics.jsonl (median tokens/s of
#   --metrics-gpus N         METRICS_GPUS          each stage's steady steps), measured on N GPUs
#   --gpu-memory-gb X        GPU_MEMORY_GB         memory per GPU instead of --gpu's (e.g. 40 for A100 40 GB)
#   --run-dir DIR            RUN_DIR               checkpoints, metrics, composed config (default runs/pretrain_655b_MODEL)
#   --recipe FILE            RECIPE                default examples/configs/recipes/pretrain_655b.yaml
#   --dry-run                                      print the plan and the launch command, start nothing
# Stage source prefixes in the stage files are placeholders: point them at your preprocessed data.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ -n "${SLURM_SUBMIT_DIR:-}" ] && [ -f "$SLURM_SUBMIT_DIR/examples/pretrain_655b.sh" ] && repo="$SLURM_SUBMIT_DIR"
model="${MODEL:-2b}" nodes="${NODES:-${SLURM_JOB_NUM_NODES:-}}" gpus="${GPUS_PER_NODE:-}" recipe_file="${RECIPE:-}"
tps="${TOKENS_PER_S_PER_GPU:-}" mfu="${MFU:-}" gpu="${GPU:-}" run_dir="${RUN_DIR:-}" dry_run=0 extra=()
metrics="${FROM_METRICS:-}" metrics_gpus="${METRICS_GPUS:-}" gpu_mem="${GPU_MEMORY_GB:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus-per-node) gpus="$2"; shift 2 ;;
    --tokens-per-s-per-gpu) tps="$2"; shift 2 ;;
    --mfu) mfu="$2"; shift 2 ;;
    --gpu) gpu="$2"; shift 2 ;;
    --from-metrics) metrics="$2"; shift 2 ;;
    --metrics-gpus) metrics_gpus="$2"; shift 2 ;;
    --gpu-memory-gb) gpu_mem="$2"; shift 2 ;;
    --run-dir) run_dir="$2"; shift 2 ;;
    --recipe) recipe_file="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '/^# SAIL-VL pretraining/,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "pretrain_655b.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$model" in
  2b|8b) ;;
  *) echo "pretrain_655b.sh: --model must be 2b or 8b, got '$model'" >&2; exit 2 ;;
esac
cd "$repo"
python=python3; [ -x "$repo/.venv/bin/python" ] && [ -z "${MEGASAIL_SYSTEM_PYTHON:-}" ] && python="$repo/.venv/bin/python"
recipe_file="${recipe_file:-examples/configs/recipes/pretrain_655b.yaml}"
lines="$("$python" -m megasail.recipes "$recipe_file" --model "$model")" || exit 2
config="" stages=() recipe=() plan_nodes=16 plan_gpus_per_node=8 plan_mfu=0.35 plan_gpu=H100-SXM
while read -r kind value; do
  case "$kind" in
    config) config="$value" ;;
    stage) stages+=(--stage "$value") ;;
    setting) recipe+=("$value") ;;
    plan_nodes) plan_nodes="$value" ;;
    plan_gpus_per_node) plan_gpus_per_node="$value" ;;
    plan_mfu) plan_mfu="$value" ;;
    plan_gpu) plan_gpu="$value" ;;
  esac
done <<< "$lines"
nodes="${nodes:-$plan_nodes}" gpus="${gpus:-$plan_gpus_per_node}" mfu="${mfu:-$plan_mfu}" gpu="${gpu:-$plan_gpu}"
run_dir="${run_dir:-runs/pretrain_655b_$model}"
recipe+=(checkpoint.save="$run_dir/checkpoints" checkpoint.load="$run_dir/checkpoints" logging.dir="$run_dir")

compose=("$python" -m megasail.plan --config "$config" "${stages[@]}" --nodes "$nodes" --gpus-per-node "$gpus"
         --model-name "SAIL-VL-${model^^}" --mfu "$mfu" --gpu "$gpu" ${tps:+--tokens-per-s-per-gpu "$tps"}
         ${metrics:+--from-metrics "$metrics"} ${metrics_gpus:+--metrics-gpus "$metrics_gpus"}
         ${gpu_mem:+--gpu-memory-gb "$gpu_mem"}
         "${recipe[@]}" "${extra[@]}")
# one task per GPU; each exports torch.distributed's variables from Slurm's and becomes the trainer (exec)
rank_env='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE'
launch=(srun --nodes "$nodes" --ntasks-per-node "$gpus" --kill-on-bad-exit=1
        bash -c "$rank_env; exec $python pretrain_vlm.py --config $run_dir/config.yaml")
if [ "$dry_run" = 1 ]; then
  "${compose[@]}"
  echo
  echo "launch (MASTER_ADDR = the first node, MASTER_PORT=29500): ${launch[*]:0:${#launch[@]}-1} '${launch[-1]}'"
  exit 0
fi
mkdir -p "$run_dir"
"${compose[@]}" --write-config "$run_dir/config.yaml"   # the plan and the run read the same composed config
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "pretrain_655b.sh: not inside a Slurm job; submit with sbatch, or use --dry-run for the plan" >&2
  exit 2
fi
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_ADDR MASTER_PORT=29500 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" CUDA_DEVICE_MAX_CONNECTIONS=1
"${launch[@]}"
