#!/usr/bin/env bash
# The tiny end-to-end demo, a few minutes on 2 CPU cores (nccl and the GPU on a GPU machine):
#   1. synthetic data: pictures of one large coloured shape with a caption that says which colour, which
#      shape and where ("a red circle at the top left"), and a small sentencepiece tokenizer
#      (tools/make_synthetic_data.py), with a held-out split
#   2. preprocessing into indexed datasets (tools/preprocess_data.py, one 448px tile per picture)
#   3. training the tiny SAIL-VL config with pretrain_vlm.py, tensor parallel 2 over two processes,
#      the real loader, for half of the stage's budget; it saves a checkpoint and stops
#   4. resuming from that checkpoint to the end of the stage
#   5. caption token accuracy on the held-out pictures: the untrained model, the trained one, and the
#      trained one shown other samples' pictures (tools/eval_captions.py). It fails unless the trained
#      model names colours, shapes and places at least 10 points more accurately with the right
#      pictures than with swapped ones: a model that learnt only the captions' grammar scores the same.
#   6. captioning the held-out pictures (tools/recaption.py) and answering a small generated benchmark
#      about some of them (which colour / what shape / where / what is where; tools/evaluate.py), the
#      trained model against the untrained one, both data-parallel over 2 processes; the recaptions are
#      scored on the benchmark too (a captioner's reply to every question about its picture).
# Sets up .venv first (tools/setup_venv.sh). Extra arguments are config overrides for both training runs.
# QUICKSTART_DIR (default runs/quickstart), QUICKSTART_SAMPLES (2000), QUICKSTART_STEPS (300) and
# QUICKSTART_BENCHMARK (12 pictures, 4 questions each) size it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck disable=SC1091
. "$repo/tools/setup_venv.sh"
cd "$repo"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="${QUICKSTART_DIR:-runs/quickstart}"
samples="${QUICKSTART_SAMPLES:-2000}"
steps="${QUICKSTART_STEPS:-300}"
bench_pictures="${QUICKSTART_BENCHMARK:-12}"
seq_length=1024
# a step is 2 sequences of 1024 tokens (data.global_batch_size=2: more updates for the same compute than
# tiny.yaml's 4); a picture (256 tokens) + caption is ~270 tokens, 3 per sequence
budget=$((steps * 6))

echo "[quickstart] 1/6 synthetic pictures and captions -> $out/raw"
python tools/make_synthetic_data.py --output "$out/raw" --samples "$samples" --heldout 200 --seed 0 \
  --benchmark "$bench_pictures"
echo "[quickstart] 2/6 preprocessing -> $out/train, $out/heldout"
for split in train heldout; do
  input="$out/raw/captions.jsonl"; [ "$split" = heldout ] && input="$out/raw/heldout.jsonl"
  python tools/preprocess_data.py --input "$input" --tokenizer "$out/raw/tokenizer" --max-tiles 1 \
    --max-seq-length "$seq_length" --output-prefix "$out/$split" --overwrite --no-progress
done

rm -rf "$out/checkpoints" "$out/logs"  # every quickstart trains from the start
# The ViT stays as initialised (frozen random features keep colour and layout; trained from scratch at
# the LLM's learning rate its patch embedding drifts and the picture stops mattering), the projector and
# the LLM learn, as in SAIL-VL's alignment stage.
stage="{name: captions, budget_samples: $budget, trainable: [projector, language],
        sources: [{prefix: $out/train, name: synthetic_captions}]}"
# patch_size=28 with downsample_ratio=1 keeps 256 tokens per 448px tile at a quarter of the ViT's
# sequence (no pixel shuffle): half the time per step, and the same accuracy here.
train=(python -m torch.distributed.run --standalone --nproc-per-node 2 pretrain_vlm.py
       --config examples/configs/tiny.yaml "data.stages=[$stage]" data.seq_length=$seq_length data.max_tiles=1
       data.global_batch_size=2 parallel.tensor=2
       model.vision.patch_size=28 model.projector.downsample_ratio=1.0
       optim.lr=5e-3 optim.min_lr=5e-4 optim.warmup_steps=null optim.warmup_fraction=0.1
       checkpoint.save="$out/checkpoints" checkpoint.load="$out/checkpoints" logging.dir="$out/logs"
       logging.wandb=false "$@")
echo "[quickstart] 3/6 training (TP=2 over 2 processes): $((steps / 2)) of about $steps steps, then save"
"${train[@]}" train.iters=$((steps / 2))
echo "[quickstart] 4/6 resuming from $out/checkpoints to the end of the stage ($budget samples)"
"${train[@]}"
python - "$out/logs/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
first, last = rows[0]["loss"], rows[-1]["loss"]
print(f"[quickstart] loss {first:.3f} at step {rows[0]['step']} -> {last:.3f} at step {rows[-1]['step']}")
sys.exit(0 if last < 0.8 * first else f"[quickstart] the loss did not fall clearly ({first:.3f} -> {last:.3f})")
EOF
echo "[quickstart] 5/6 caption token accuracy on held-out pictures"
if ! python tools/eval_captions.py --checkpoint "$out/checkpoints" --data "$out/heldout" --samples 200 \
    --min-margin 10 --json "$out/eval.json"; then
  echo "[quickstart] failed: the trained model does not read the pictures (see the table above)" >&2
  exit 1
fi

echo "[quickstart] 6/6 captions and benchmark answers of the trained and the untrained model"
# The untrained model as a checkpoint: one step at learning rate 0 leaves the initial weights unchanged.
"${train[@]}" train.iters=1 optim.lr=0 optim.min_lr=0 checkpoint.save="$out/untrained" checkpoint.load=null \
  checkpoint.overwrite=true logging.dir="$out/untrained_logs" > "$out/untrained.log" 2>&1 \
  || { tail -20 "$out/untrained.log" >&2; exit 1; }
bench="$out/raw/benchmark"
dp2=(python -m torch.distributed.run --standalone --nproc-per-node 2)
# --max-tiles 1 as trained (recaption.py defaults to 6); captions here are ~7 tokens, under its default minimum of 8
"${dp2[@]}" tools/recaption.py --load "$out/checkpoints" --images "$out/raw/heldout.jsonl" --output "$out/recaption" \
  --max-tiles 1 --min-caption-tokens 3 --batch-size 8 --max-new-tokens 16 --overwrite --no-progress
questions=()
for kind in colour shape where what_is_where; do questions+=(--benchmark "$bench/$kind.jsonl"); done
for model in trained untrained; do
  load="$out/checkpoints"; [ "$model" = untrained ] && load="$out/untrained"
  "${dp2[@]}" tools/evaluate.py --load "$load" "${questions[@]}" --output-dir "$out/evaluate/$model" \
    --batch-size 8 --max-new-tokens 16 --overwrite --no-progress
done
# recaption.py's captions as the answer to every question about their picture, scored the same way
python - "$out/recaption" "$out/evaluate/captions" "$bench" <<'PY'
import glob, json, os, sys
recaptions, out, bench = sys.argv[1:]
captions = {}
for path in glob.glob(os.path.join(recaptions, "captions-*.jsonl")):
    captions.update((r["id"], r["caption"]) for r in map(json.loads, open(path)))
os.makedirs(out, exist_ok=True)
for name in ("colour", "shape", "where", "what_is_where"):
    with open(os.path.join(out, f"{name}.predictions.jsonl"), "w") as f:
        for q in map(json.loads, open(os.path.join(bench, f"{name}.jsonl"))):
            if q["picture"] in captions:  # a filtered caption leaves its questions unanswered (scored 0)
                f.write(json.dumps({"id": q["id"], "prediction": captions[q["picture"]]}) + "\n")
PY
python tools/evaluate.py "${questions[@]}" --predictions-dir "$out/evaluate/captions" \
  --output-dir "$out/evaluate/captions" > /dev/null
python - "$out/evaluate" "$out/recaption" <<'PY'
import glob, json, os, sys
evaluated, recaptions = sys.argv[1:]
rows = ("untrained", "trained", "captions")
scores = {m: json.load(open(os.path.join(evaluated, m, "scores.json")))["benchmarks"] for m in rows}
print("[quickstart] benchmark accuracy (% of questions whose answer is in the reply), held-out pictures")
print("| question | n | untrained | trained | trained, recaption.py's captions |")
print("|---|---|---|---|---|")
for name, result in scores["trained"].items():
    print(f"| {name} | {result['n']} | " + " | ".join(f"{scores[m][name]['accuracy']:.1f}" for m in rows) + " |")
mean = {m: sum(r["accuracy"] for r in scores[m].values()) / len(scores[m]) for m in rows}
print("| mean | | " + " | ".join(f"{mean[m]:.1f}" for m in rows) + " |")
lines = [json.loads(line) for p in sorted(glob.glob(os.path.join(recaptions, "*-*.jsonl"))) for line in open(p)]
kept = sorted((r for r in lines if "caption" in r and "reason" not in r), key=lambda r: int(r["id"].split("-")[1]))
same = sum(r["caption"] == r["source_caption"] for r in kept)
print(f"[quickstart] recaption.py: {len(kept)} of {len(lines)} held-out pictures captioned, {same} exactly as drawn")
for r in kept[:3]:
    print(f"[quickstart] {r['id']}: captioned {r['caption']!r}, drawn as {r['source_caption']!r}")
PY
