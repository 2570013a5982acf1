#!/usr/bin/env python
"""Caption token accuracy on held-out image-caption samples: a trained checkpoint against the untrained model.

    python tools/eval_captions.py --checkpoint runs/quickstart/checkpoints --data runs/quickstart/heldout

For every caption token (the loss-bearing positions of a caption-template dataset, written by
tools/preprocess_data.py from tools/make_synthetic_data.py's heldout.jsonl) the model predicts the
next token from the image and the caption so far (teacher forcing); accuracy is the share of
argmax predictions equal to the true token. "content" counts only tokens of the words that
depend on the picture (colours, shapes, places; --content-words), which grammar alone cannot
predict. Rows:

  untrained               the model a run with this config and seed starts from (megasail.training.init)
  trained                 the checkpoint's weights
  trained, images swapped every caption scored against the previous sample's picture: content accuracy
                          falls toward chance if (and only if) the model reads the image

Runs in one process at TP=1 (a checkpoint saved at any TP/PP layout loads here). The model config
comes from the checkpoint (or --config). --json writes the rows to a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

# the place and content vocabulary of tools/make_synthetic_data.py's captions
CONTENT_WORDS = (
    "red,green,blue,yellow,purple,black,circle,square,triangle,diamond,top,bottom,left,right,center"
)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset prefix of held-out caption samples")
    ap.add_argument(
        "--checkpoint", default=None, help="checkpoint root or step dir; omitted: untrained row only"
    )
    ap.add_argument(
        "--config", default=None, help="run config YAML (default: the one saved in the checkpoint)"
    )
    ap.add_argument(
        "--samples", type=int, default=200, help="held-out samples to score (at most the dataset's)"
    )
    ap.add_argument(
        "--content-words", default=CONTENT_WORDS, help="comma-separated words scored as 'content'"
    )
    ap.add_argument("--no-swap", action="store_true", help="skip the images-swapped control row")
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    return ap.parse_intermixed_args(argv)


def run_config(args):
    """The RunConfig the checkpoint was trained with (or --config), plus overrides."""
    from megasail.config import load_config

    if args.config:
        return load_config(args.config, args.overrides)
    if not args.checkpoint:
        raise SystemExit("eval_captions: give --checkpoint or --config")
    from megasail.training.checkpoint import read_meta

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(read_meta(args.checkpoint)["config"])
        f.flush()
        return load_config(f.name, args.overrides)


def content_token_ids(prefix: str, words: list[str]) -> set[int]:
    """Token ids of the content words in the dataset's tokenizer (each word as it appears mid-caption)."""
    from megasail.data.text.tokenizer import MultimodalTokenizer

    with open(prefix + ".manifest.json") as f:
        tokenizer = MultimodalTokenizer.load(json.load(f)["tokenizer"]["path"])
    ids = set()
    for word in words:
        pieces = tokenizer.encode(" " + word)
        ids.update(pieces[-1:])  # the word's last piece: the one carrying its identity when split
    return ids


def heldout_loader(cfg, prefix: str, samples: int):
    """One micro-batch of one packed sequence at a time over `samples` samples of `prefix`, in order."""
    from megasail.data.loader.config import SourceConfig, StageConfig
    from megasail.data.loader.data_loader import MultimodalDataLoader

    stage = StageConfig(
        name="heldout", sources=[SourceConfig(prefix=prefix)], budget_samples=samples, trainable=["projector"]
    )
    data = dataclasses.replace(
        cfg.data,
        stages=[stage],
        path=None,
        micro_batch_size=1,
        global_batch_size=1,
        num_workers=0,
        balance_dp=False,
    )
    return MultimodalDataLoader(data)


@torch.no_grad()
def score(model, batches: list[dict], content_ids: set[int], swap_images: bool = False) -> dict:
    """Teacher-forced argmax accuracy on loss-bearing tokens, overall and on content tokens."""
    from megasail.training.step import packed_attention

    totals = dict(tokens=0, correct=0, content_tokens=0, content_correct=0)
    content = torch.tensor(sorted(content_ids))
    for i, batch in enumerate(batches):
        pixels = batch.get("pixel_values")
        if swap_images:
            previous = batches[i - 1].get("pixel_values")
            if pixels is None or previous is None or previous.shape != pixels.shape:
                continue  # only sequences whose tile count matches the previous one's are swapped
            pixels = previous
        batch, packed_seq_params = packed_attention(batch, model)  # the samples of a row kept apart
        logits = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            pixel_values=pixels,
            attention_mask=batch.get("attention_mask"),
            packed_seq_params=packed_seq_params,
        )
        mask = batch["loss_mask"].bool()
        labels = batch["labels"][mask]
        hits = logits.argmax(-1)[mask] == labels
        is_content = torch.isin(labels, content)
        totals["tokens"] += labels.numel()
        totals["correct"] += int(hits.sum())
        totals["content_tokens"] += int(is_content.sum())
        totals["content_correct"] += int((hits & is_content).sum())
    totals["accuracy"] = totals["correct"] / max(totals["tokens"], 1)
    totals["content_accuracy"] = totals["content_correct"] / max(totals["content_tokens"], 1)
    return totals


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cfg = run_config(args)
    from megasail.config import ParallelConfig
    from megasail.runtime import destroy, initialize
    from megasail.training.init import init_weights
    from megasail.training.model_builder import build_model_chunks

    initialize(1, 1, seed=cfg.seed)
    model = build_model_chunks(cfg.model, ParallelConfig())[0]
    init_weights([model], cfg.seed)
    model.eval()
    loader = heldout_loader(cfg, args.data, args.samples)
    batches = list(loader)
    loader.close()
    content_ids = content_token_ids(args.data, [w for w in args.content_words.split(",") if w])
    rows = [{"row": "untrained", **score(model, batches, content_ids)}]
    if args.checkpoint:
        from megasail.training.checkpoint import load_checkpoint

        meta = load_checkpoint(args.checkpoint, [model], weights_only=True)
        rows.append({"row": f"trained (step {meta.get('iteration')})", **score(model, batches, content_ids)})
        if not args.no_swap:
            rows.append(
                {"row": "trained, images swapped", **score(model, batches, content_ids, swap_images=True)}
            )
    samples = sum(int(b["num_samples"].sum()) for b in batches if "num_samples" in b) or args.samples
    print(
        f"caption token accuracy on {samples} held-out samples of {args.data} "
        f"({rows[0]['tokens']} caption tokens, {rows[0]['content_tokens']} of them content words)"
    )
    print("| model | token accuracy | content-word accuracy |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['accuracy']:.1%} | {r['content_accuracy']:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    destroy()
    return rows


if __name__ == "__main__":
    main()
