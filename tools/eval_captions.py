#!/usr/bin/env python
"""Caption token accuracy on held-out image-caption samples: a trained checkpoint against the untrained model.

    python tools/eval_captions.py --checkpoint runs/quickstart/checkpoints --data runs/quickstart/heldout

For every caption token (the loss-bearing positions of a caption-template dataset, written by
tools/preprocess_data.py from tools/make_synthetic_data.py's heldout.jsonl) the model predicts the
next token from the image and the caption so far (teacher forcing); accuracy is the share of
argmax predictions equal to the true token. "content" counts only tokens of the words that
depend on the picture (colours, shapes, places; --content-words), which grammar alone cannot
predict. Rows:

  untrained               the model a run with this config and seed starts from (megasail.models.init)
  trained                 the checkpoint's weights
  trained, images swapped every caption scored against another sample's picture (the previous image
                          with as many tiles): content accuracy falls toward chance if (and only if)
                          the model reads the image

With a checkpoint it then prints the image margin, trained minus swapped content-word accuracy in
points; --min-margin N exits with status 1 when it is under N (the quickstart asks for 10).

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
    ap.add_argument(
        "--min-margin",
        type=float,
        default=None,
        help="exit with status 1 when trained content-word accuracy beats the images-swapped row by "
        "fewer than this many points (needs --checkpoint)",
    )
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = ap.parse_intermixed_args(argv)
    if args.min_margin is not None and (args.no_swap or not args.checkpoint):
        ap.error(
            "--min-margin compares the trained row with the images-swapped one: give --checkpoint, not --no-swap"
        )
    return args


def run_config(args):
    """The RunConfig the checkpoint was trained with (or --config), plus overrides."""
    from megasail.config import load_config

    if args.config:
        return load_config(args.config, args.overrides)
    if not args.checkpoint:
        raise SystemExit("eval_captions: give --checkpoint or --config")
    from megasail.checkpoint import read_meta

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


def image_tile_counts(input_ids: torch.Tensor, image_token_id: int, tokens_per_tile: int) -> list[int]:
    """Tiles of every image in a packed batch, in order: each image is one run of <IMG_CONTEXT> ids
    (<img> and </img> around it separate neighbours). input_ids: [b, s]."""
    counts = []
    for row in (input_ids == image_token_id).to(torch.int8):
        edges = torch.diff(torch.cat([row.new_zeros(1), row, row.new_zeros(1)]))
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        counts += [int(e - s) // tokens_per_tile for s, e in zip(starts, ends, strict=True)]
    return counts


def swapped_pixels(batches: list[dict], image_token_id: int, tokens_per_tile: int) -> list:
    """Every batch's pixel_values with each image replaced by the previous image (over all batches,
    wrapping around) that has as many tiles, so every caption is scored against another picture."""
    images = []  # (batch index, tiles [n, 3, H, W]) in order of appearance
    for i, batch in enumerate(batches):
        pixels = batch.get("pixel_values")
        if pixels is None:
            continue
        counts = image_tile_counts(batch["input_ids"], image_token_id, tokens_per_tile)
        images += [(i, tiles) for tiles in torch.split(pixels, counts)]
    replaced = []
    for k, (_, tiles) in enumerate(images):
        other = next(
            (images[k - j][1] for j in range(1, len(images)) if images[k - j][1].shape == tiles.shape), tiles
        )
        replaced.append(other)  # only a lone image of its tile count keeps its own picture
    out = [None] * len(batches)
    for i in range(len(batches)):
        mine = [t for (b, _), t in zip(images, replaced, strict=True) if b == i]
        out[i] = torch.cat(mine) if mine else None
    return out


@torch.no_grad()
def score(model, batches: list[dict], content_ids: set[int], pixels: list | None = None) -> dict:
    """Teacher-forced argmax accuracy on loss-bearing tokens, overall and on content tokens.

    pixels: per batch, the pixel_values to use instead of the batch's own (the swapped control)."""
    from megasail.training.step import packed_attention

    totals = dict(tokens=0, correct=0, content_tokens=0, content_correct=0)
    content = torch.tensor(sorted(content_ids))
    for i, batch in enumerate(batches):
        batch, packed_seq_params = packed_attention(batch, model)  # the samples of a row kept apart
        logits = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            pixel_values=batch.get("pixel_values") if pixels is None else pixels[i],
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


def image_margin(rows: list[dict]) -> float:
    """Content-word accuracy of the trained model minus that with images swapped, in points."""
    by_name = {r["row"].split(" (")[0]: r for r in rows}
    return 100 * (
        by_name["trained"]["content_accuracy"] - by_name["trained, images swapped"]["content_accuracy"]
    )


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    cfg = run_config(args)
    from megasail.config import ParallelConfig
    from megasail.models.init import init_weights
    from megasail.runtime import destroy, initialize
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
        from megasail.checkpoint import load_checkpoint

        meta = load_checkpoint(args.checkpoint, [model], weights_only=True)
        rows.append({"row": f"trained (step {meta.get('iteration')})", **score(model, batches, content_ids)})
        if not args.no_swap:
            swapped = swapped_pixels(batches, cfg.model.image_token_id, cfg.model.tokens_per_tile)
            rows.append({"row": "trained, images swapped", **score(model, batches, content_ids, swapped)})
    samples = sum(int(b["num_samples"].sum()) for b in batches if "num_samples" in b) or args.samples
    print(
        f"caption token accuracy on {samples} held-out samples of {args.data} "
        f"({rows[0]['tokens']} caption tokens, {rows[0]['content_tokens']} of them content words)"
    )
    print("| model | token accuracy | content-word accuracy |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['accuracy']:.1%} | {r['content_accuracy']:.1%} |")
    status = 0
    if len(rows) == 3:
        margin = image_margin(rows)
        print(
            f"content-word accuracy: trained {rows[1]['content_accuracy']:.1%}, images swapped "
            f"{rows[2]['content_accuracy']:.1%}: the picture adds {margin:+.1f} points"
            + ("" if args.min_margin is None else f" (at least {args.min_margin:g} needed)")
        )
        if args.min_margin is not None and margin < args.min_margin:
            print(
                f"error: the trained model does not read the picture ({margin:+.1f} < {args.min_margin:g} "
                "points of content-word accuracy over swapped pictures)",
                file=sys.stderr,
            )
            status = 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    destroy()
    return status


if __name__ == "__main__":
    sys.exit(main())
