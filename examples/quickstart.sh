#!/usr/bin/env bash
# The tiny end-to-end demo, a few minutes on 2 CPU cores (nccl and the GPU on a GPU machine):
#   1. synthetic data: pictures of coloured shapes with captions that say what is where, and a small
#      sentencepiece tokenizer (tools/make_synthetic_data.py), with a held-out split
#   2. preprocessing into indexed datasets (tools/preprocess_data.py, one 448px tile per picture)
#   3. training the tiny SAIL-VL config with pretrain_vlm.py, tensor parallel 2 over two processes,
#      the real loader, for half of the stage's budget; it saves a checkpoint and stops
#   4. resuming from that checkpoint to the end of the stage
#   5. caption token accuracy on the held-out pictures, trained against the untrained model
#      (tools/eval_captions.py)
# Sets up .venv first (tools/setup_venv.sh). Extra arguments are config overrides for both training runs.
# QUICKSTART_DIR (default runs/quickstart), QUICKSTART_SAMPLES (2000) and QUICKSTART_STEPS (40) size it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/tools/setup_venv.sh"
cd "$repo"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="${QUICKSTART_DIR:-runs/quickstart}"
samples="${QUICKSTART_SAMPLES:-2000}"
steps="${QUICKSTART_STEPS:-40}"
seq_length=1024
# tiny.yaml packs 4 sequences of 1024 tokens per step; a picture (256 tokens) + caption is ~280 tokens, 3 per sequence
budget=$((steps * 12))

echo "[quickstart] 1/5 synthetic pictures and captions -> $out/raw"
python tools/make_synthetic_data.py --output "$out/raw" --samples "$samples" --heldout 200 --seed 0
echo "[quickstart] 2/5 preprocessing -> $out/train, $out/heldout"
for split in train heldout; do
  input="$out/raw/captions.jsonl"; [ "$split" = heldout ] && input="$out/raw/heldout.jsonl"
  python tools/preprocess_data.py --input "$input" --tokenizer "$out/raw/tokenizer" --max-tiles 1 \
    --max-seq-length "$seq_length" --output-prefix "$out/$split" --overwrite --no-progress
done

rm -rf "$out/checkpoints" "$out/logs"  # every quickstart trains from the start
stage="{name: captions, budget_samples: $budget, trainable: [vision, projector, language],
        sources: [{prefix: $out/train, name: synthetic_captions}]}"
# vocab_size: the 128-piece tokenizer padded for TP=2 (tiny.yaml itself keeps Qwen2.5's vocabulary)
train=(python -m torch.distributed.run --standalone --nproc-per-node 2 pretrain_vlm.py
       --config examples/configs/tiny.yaml "data.stages=[$stage]" data.seq_length=$seq_length data.max_tiles=1
       parallel.tensor=2 model.language.vocab_size=256 optim.lr=2e-3 optim.min_lr=2e-4 optim.warmup_steps=3
       checkpoint.save="$out/checkpoints" checkpoint.load="$out/checkpoints" logging.dir="$out/logs"
       logging.wandb=false "$@")
echo "[quickstart] 3/5 training (TP=2 over 2 processes): $((steps / 2)) of about $steps steps, then save"
"${train[@]}" train.iters=$((steps / 2))
echo "[quickstart] 4/5 resuming from $out/checkpoints to the end of the stage ($budget samples)"
"${train[@]}"
python - "$out/logs/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
first, last = rows[0]["loss"], rows[-1]["loss"]
print(f"[quickstart] loss {first:.3f} at step {rows[0]['step']} -> {last:.3f} at step {rows[-1]['step']}")
sys.exit(0 if last < 0.8 * first else f"[quickstart] the loss did not fall clearly ({first:.3f} -> {last:.3f})")
EOF
echo "[quickstart] 5/5 caption token accuracy on held-out pictures"
python tools/eval_captions.py --checkpoint "$out/checkpoints" --data "$out/heldout" --samples 200
