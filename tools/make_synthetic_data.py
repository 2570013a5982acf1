#!/usr/bin/env python
"""Synthetic image-caption data for quick runs: coloured shapes whose captions say what is where.

    python tools/make_synthetic_data.py --output data/synth --samples 2000 --heldout 200 --seed 0

Writes, ready for tools/preprocess_data.py (caption JSONL, see docs/preprocessing.md):

  DIR/captions.jsonl    {"id", "image": "images/train_000000.png", "caption": "a red circle at the top left"}
  DIR/heldout.jsonl     the same for --heldout samples drawn from their own random stream (evaluation)
  DIR/images/           PNG and JPEG pictures, 96-512 px on the long side, aspect ratio 1:2 to 2:1
  DIR/tokenizer/        sp.model: a small sentencepiece BPE model trained on the training
                        captions; the chat and image tokens (<|im_start|>, <|im_end|>, <img>, </img>,
                        <IMG_CONTEXT>) are control symbols of the model, and id 0 is <pad>
  DIR/benchmark/        with --benchmark N: colour.jsonl, shape.jsonl, where.jsonl, what_is_where.jsonl,
                        questions about N one-shape held-out pictures for tools/evaluate.py (scored by
                        OCRBench's rule: the answer inside the prediction); "picture" names the
                        heldout.jsonl id asked about
  DIR/summary.json      counts, vocabulary size and the token ids a config needs (pad, image context)

Each picture holds one large shape (circle, square, triangle, diamond; six colours) in a cell of a 3x3
grid (--max-shapes N: 1 to N shapes in distinct cells, named in reading order), so a caption's content
words (colour, shape, place) can only be predicted by looking at the image. One shape is what the tiny
quickstart model learns to read within minutes; with several, naming the first one's colour needs the
colours bound to places in reading order, which it does not learn in that time. Output is a function of
--seed, --samples, --heldout and --max-shapes only: the training split does not depend on --heldout,
and two runs write identical files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys

from PIL import Image, ImageDraw
from tqdm import tqdm

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# 3x3 grid cells (row, column) -> the phrase a caption uses for them; none is a substring of another (a
# benchmark answer "at the top" would be found inside a caption saying "at the top left")
PLACES = {
    (0, 0): "at the top left",
    (0, 1): "at the top center",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom center",
    (2, 2): "at the bottom right",
}
# The words that depend on the picture (the rest of a caption is grammar); eval_captions scores them apart.
CONTENT_WORDS = tuple(COLOURS) + SHAPES + ("top", "bottom", "left", "right", "center")
PAD, UNK = "<pad>", "<unk>"
# A shape's side as a share of its cell's shorter side: large, so that at 448px a shape spans several
# ViT patches, yet inside its cell.
SIDE = (0.7, 0.95)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour) -> None:
    """Fill `shape` inside `box` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def make_sample(rng: random.Random, max_shapes: int = 1) -> tuple[Image.Image, str, str, list[dict]]:
    """One picture with 1..max_shapes shapes, its caption, its file format ("PNG" or "JPEG") and its
    shapes [{"colour", "shape", "place"}] in caption order, all drawn from `rng`."""
    long_side = rng.randint(96, 512)
    aspect = 2 ** rng.uniform(-1, 1)  # width / height in [1/2, 2]
    width, height = (
        (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    )
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    cells = rng.sample(sorted(PLACES), rng.randint(1, max_shapes))
    cells.sort()  # captions name shapes in reading order: top to bottom, left to right
    cw, ch = width / 3, height / 3
    phrases, shapes = [], []
    for row, col in cells:
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        side = rng.uniform(*SIDE) * min(cw, ch)
        cx = (col + 0.5) * cw + rng.uniform(-0.5, 0.5) * (cw - side)
        cy = (row + 0.5) * ch + rng.uniform(-0.5, 0.5) * (ch - side)
        box = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
        draw_shape(draw, shape, box, COLOURS[colour])
        phrases.append(f"a {colour} {shape} {PLACES[(row, col)]}")
        shapes.append({"colour": colour, "shape": shape, "place": PLACES[(row, col)]})
    caption = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return image, caption, rng.choice(("PNG", "JPEG")), shapes


def write_split(out_dir: str, name: str, count: int, seed: int, max_shapes: int = 1) -> list[dict]:
    """Write `count` pictures and DIR/{name}.jsonl (captions.jsonl for "train"); returns the records,
    each with its "shapes" (kept out of the JSONL: preprocessing reads caption records)."""
    rng = random.Random(f"megasail-synthetic:{seed}:{name}")  # one stream per split
    records = []
    jsonl = os.path.join(out_dir, "captions.jsonl" if name == "train" else f"{name}.jsonl")
    with open(jsonl + ".tmp", "w") as f:
        for i in tqdm(range(count), desc=f"{name} images", unit="img", disable=count == 0):
            image, caption, fmt, shapes = make_sample(rng, max_shapes)
            rel = f"images/{name}_{i:06d}.{'png' if fmt == 'PNG' else 'jpg'}"
            kwargs = {"quality": 90} if fmt == "JPEG" else {}
            image.save(os.path.join(out_dir, rel), format=fmt, **kwargs)
            record = {"id": f"{name}-{i}", "image": rel, "caption": caption}
            f.write(json.dumps(record) + "\n")
            records.append({**record, "shapes": shapes})
    os.replace(jsonl + ".tmp", jsonl)
    return records


# Question kinds of the benchmark, each asked of a one-shape picture: (question, answer) templates over
# the shape's colour, shape and place. Answers are phrases a caption holds ("at the top left"), so that
# a captioning model is scored by OCRBench's rule (the answer is a substring of the prediction).
QUESTIONS = {
    "colour": ("Which colour is the shape?", "{colour}"),
    "shape": ("What shape is in the picture?", "{shape}"),
    "where": ("Where is the {colour} {shape}?", "{place}"),
    "what_is_where": ("What is where in the picture?", "{colour} {shape} {place}"),
}


def write_benchmark(out_dir: str, records: list[dict], pictures: int) -> dict[str, str]:
    """Benchmark files for tools/evaluate.py from the first `pictures` one-shape held-out records:
    DIR/benchmark/NAME.jsonl per question kind of QUESTIONS ({"id", "image", "question", "answers",
    "metric": "ocrbench", "picture": the record's id}). Returns {NAME: path}."""
    single = [r for r in records if len(r["shapes"]) == 1][:pictures]
    if len(single) < pictures:
        raise ValueError(
            f"--benchmark {pictures} needs as many one-shape held-out pictures; there are {len(single)} "
            "(raise --heldout)"
        )
    folder = os.path.join(out_dir, "benchmark")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, (question, answer) in QUESTIONS.items():
        paths[name] = os.path.join(folder, f"{name}.jsonl")
        with open(paths[name] + ".tmp", "w") as f:
            for r in single:
                shape = r["shapes"][0]
                line = {
                    "id": f"{r['id']}-{name}",
                    "image": os.path.join("..", r["image"]),
                    "question": question.format(**shape),
                    "answers": [answer.format(**shape)],
                    "metric": "ocrbench",
                    "picture": r["id"],
                }
                f.write(json.dumps(line) + "\n")
        os.replace(paths[name] + ".tmp", paths[name])
    return paths


def train_tokenizer(captions: list[str], tokenizer_dir: str, vocab_size: int) -> str:
    """A sentencepiece unigram model over the captions, with the template's tokens as control symbols.

    Control symbols have ids but are never produced from text, so a caption spelling "<|im_end|>"
    stays ordinary characters (megasail.data.text.tokenizer's guarantee); <pad> is id 0."""
    import sentencepiece as spm

    from megasail.data.text.tokenizer import REQUIRED_SPECIAL_TOKENS

    os.makedirs(tokenizer_dir, exist_ok=True)
    model = io.BytesIO()  # written by us, so the model holds no output path and is the same bytes anywhere
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        pad_piece=PAD,
        unk_id=1,
        unk_piece=UNK,
        bos_id=-1,
        eos_id=-1,
        control_symbols=list(REQUIRED_SPECIAL_TOKENS),
        hard_vocab_limit=False,
        num_threads=1,  # deterministic
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    path = os.path.join(tokenizer_dir, "sp.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def make_dataset(
    output: str,
    samples: int,
    heldout: int = 0,
    seed: int = 0,
    vocab_size: int = 128,
    max_shapes: int = 1,
    benchmark: int = 0,
) -> dict:
    """Write the whole directory (see the module docstring); returns the summary also saved as summary.json."""
    if samples < 1:
        raise ValueError(f"--samples must be >= 1, got {samples}")
    if heldout < 0:
        raise ValueError(f"--heldout must be >= 0, got {heldout}")
    if not 1 <= max_shapes <= len(PLACES):
        raise ValueError(
            f"--max-shapes must lie in 1..{len(PLACES)} (one shape per grid cell), got {max_shapes}"
        )
    if not 0 <= benchmark <= heldout:
        raise ValueError(f"--benchmark asks about held-out pictures: 0..--heldout={heldout}, got {benchmark}")
    os.makedirs(os.path.join(output, "images"), exist_ok=True)
    captions = [r["caption"] for r in write_split(output, "train", samples, seed, max_shapes)]
    benchmark_files = {}
    if heldout:
        held = write_split(output, "heldout", heldout, seed, max_shapes)
        if benchmark:
            benchmark_files = write_benchmark(output, held, benchmark)
    model = train_tokenizer(captions, os.path.join(output, "tokenizer"), vocab_size)

    from megasail.data.text.tokenizer import IMG_CONTEXT, MultimodalTokenizer

    tok = MultimodalTokenizer.load(os.path.dirname(model))
    summary = {
        "samples": samples,
        "heldout": heldout,
        "seed": seed,
        "max_shapes": max_shapes,
        "captions": os.path.join(output, "captions.jsonl"),
        "heldout_captions": os.path.join(output, "heldout.jsonl") if heldout else None,
        "benchmark": benchmark_files,
        "tokenizer": os.path.dirname(model),
        "vocab_size": tok.vocab_size,
        "pad_token_id": 0,
        "image_token_id": tok.token_id(IMG_CONTEXT),
    }
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--output", required=True, help="directory to write (created; existing files are replaced)"
    )
    ap.add_argument("--samples", type=int, required=True, help="training image-caption pairs")
    ap.add_argument(
        "--heldout", type=int, default=0, help="extra pairs from a separate stream, in heldout.jsonl"
    )
    ap.add_argument("--seed", type=int, default=0, help="random seed: same seed and counts, same bytes")
    ap.add_argument("--vocab-size", type=int, default=128, help="sentencepiece pieces (a soft limit)")
    ap.add_argument(
        "--max-shapes",
        type=int,
        default=1,
        help="shapes per picture are drawn from 1..N (distinct grid cells)",
    )
    ap.add_argument(
        "--benchmark",
        type=int,
        default=0,
        metavar="N",
        help="also write DIR/benchmark/: colour, shape, where and what_is_where questions (tools/evaluate.py "
        "files) about the first N one-shape held-out pictures",
    )
    args = ap.parse_args(argv)
    try:
        summary = make_dataset(
            args.output,
            args.samples,
            args.heldout,
            args.seed,
            args.vocab_size,
            args.max_shapes,
            args.benchmark,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {summary['samples']} training + {summary['heldout']} held-out samples to {args.output}; "
        f"tokenizer {summary['tokenizer']} (vocab {summary['vocab_size']}, <IMG_CONTEXT>={summary['image_token_id']})"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
    sys.exit(main())
