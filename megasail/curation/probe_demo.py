"""Synthetic SFT sources for trying the source probes on a CPU: colour questions about one-colour pictures.

    python -m megasail.curation.probe_demo --output runs/curate_demo/data

Writes, under OUTPUT:

    tokenizer/                 a small byte-level BPE tokenizer (chat and image tokens added by preprocessing)
    sources/base.*             the base mixture's data: "What colour is this picture?" -> "red"
    sources/good.*             more of the same kind, other pictures
    sources/corrupted.*        other pictures whose answers are shuffled between them (captions that do not
                               match their image, the fault probing must catch)
    sources/duplicate.*        a byte copy of sources/base under another prefix (adds nothing new)
    benchmark/colours.jsonl    held-out pictures, metric vqa (tools/evaluate.py's JSONL format)
    base.yaml                  the base mixture as a stage file (sources: base)
    candidates.yaml            the candidates in this order: corrupted, good, duplicate
    demo.json                  what was written (counts, paths)

A picture's colour can only be read from its pixels, so a model trained on the corrupted source learns
answers that the image does not support. Output is a function of --seed and the counts only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys

import numpy as np

# the colours tools/make_synthetic_data.py draws its shapes in
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20),
           "purple": (140, 40, 170), "black": (20, 20, 20)}  # fmt: skip
QUESTIONS = ("What colour is this picture?", "Which colour fills this image?", "Name the colour.", "Colour?")
CANDIDATES = ("corrupted", "good", "duplicate")
_CORPUS = [
    "What colour is this picture? Which colour fills this image? Name the colour. Colour?",
    " ".join(COLOURS) + ". Answer with one word.",
    "system user assistant image question answer",
]


def write_picture(path: str, colour: str, seed: int) -> None:
    """A small noisy picture of one colour (24-64 px a side: one 448 px tile)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = (int(x) for x in rng.integers(24, 65, 2))
    pixels = np.array(COLOURS[colour])[None, None] + rng.normal(0, 20, (height, width, 3))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def make_tokenizer(directory: str, vocab_size: int = 300) -> str:
    """A byte-level BPE tokenizer.json trained on the questions and colour words (milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(_CORPUS * 8, trainer)
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return directory


def _records(root: str, name: str, count: int, seed: int) -> list[dict]:
    """count chat records about new pictures root/images/NAME_i.png (their true colour as the answer)."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        colour = rng.choice(list(COLOURS))
        image = f"{name}_{i:05d}.png"
        write_picture(os.path.join(root, "images", image), colour, seed=seed * 100_003 + i)
        records.append({"id": f"{name}{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS)}, {"from": "gpt", "value": colour}]})  # fmt: skip
    return records


def _preprocess(records: list[dict], root: str, name: str, tokenizer: str) -> str:
    from megasail.data.preprocess import PreprocessConfig, run_preprocess

    jsonl = os.path.join(root, "jsonl", f"{name}.jsonl")
    os.makedirs(os.path.dirname(jsonl), exist_ok=True)
    with open(jsonl, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    prefix = os.path.join(root, "sources", name)
    run_preprocess(PreprocessConfig(inputs=[jsonl], output_prefix=prefix, tokenizer=tokenizer,
                                    image_root=os.path.join(root, "images"), max_tiles=1, progress=False))  # fmt: skip
    return prefix


def shuffle_answers(records: list[dict], seed: int) -> list[dict]:
    """The records with their answers permuted among them (a derangement where colours allow)."""
    rng = random.Random(seed)
    answers = [r["conversations"][1]["value"] for r in records]
    order = list(range(len(records)))
    rng.shuffle(order)
    out = []
    for r, j in zip(records, order, strict=True):
        r = json.loads(json.dumps(r))
        r["conversations"][1]["value"] = answers[j]
        out.append(r)
    return out


def _copy_prefix(src: str, dst: str) -> None:
    folder = os.path.dirname(src)
    stem = os.path.basename(src)
    for name in sorted(os.listdir(folder)):
        if name.startswith(stem + "."):
            shutil.copyfile(os.path.join(folder, name), dst + name[len(stem):])


def write_benchmark(root: str, questions: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for i in range(questions):
        colour = rng.choice(list(COLOURS))
        image = f"images/q{i:04d}.png"
        write_picture(os.path.join(root, image), colour, seed=seed * 100_003 + i)
        lines.append({"id": f"q{i}", "image": image, "question": rng.choice(QUESTIONS), "answers": [colour] * 10})
    lines[0].update(metric="vqa", prompt_suffix="")  # the training questions carry no instruction either
    path = os.path.join(root, "colours.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    return path


def build(output: str, samples: int = 240, questions: int = 60, seed: int = 0) -> dict:
    """Write the demo under output (skipped when its demo.json exists); returns demo.json's content."""
    import yaml

    summary_path = os.path.join(output, "demo.json")
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            return json.load(f)
    output = os.path.abspath(output)
    tokenizer = make_tokenizer(os.path.join(output, "tokenizer"))
    base_records = _records(output, "base", samples, seed * 10 + 1)
    base = _preprocess(base_records, output, "base", tokenizer)
    good = _preprocess(_records(output, "good", samples, seed * 10 + 2), output, "good", tokenizer)
    true_records = _records(output, "corrupted", samples, seed * 10 + 3)
    corrupted_records = shuffle_answers(true_records, seed)
    corrupted = _preprocess(corrupted_records, output, "corrupted", tokenizer)
    duplicate = os.path.join(output, "sources", "duplicate")
    _copy_prefix(base, duplicate)
    benchmark = write_benchmark(os.path.join(output, "benchmark"), questions, seed * 10 + 4)
    prefixes = {"corrupted": corrupted, "good": good, "duplicate": duplicate}
    with open(os.path.join(output, "candidates.yaml"), "w", encoding="utf-8") as f:
        f.write("# candidate SFT sources, in the order incremental probing adds them\n")
        yaml.safe_dump({name: {"prefix": prefixes[name], "weight": 1.0} for name in CANDIDATES}, f, sort_keys=False)
    with open(os.path.join(output, "base.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump({"sources": [{"prefix": base, "weight": 1.0, "name": "base"}]}, f, sort_keys=False)
    wrong = sum(a["conversations"][1]["value"] != b["conversations"][1]["value"]
                for a, b in zip(true_records, corrupted_records, strict=True))  # fmt: skip
    summary = {
        "samples_per_source": samples, "benchmark_questions": questions, "seed": seed,
        "tokenizer": tokenizer, "base": base, "candidates": prefixes, "benchmark": benchmark,
        "candidates_file": os.path.join(output, "candidates.yaml"), "base_mixture": os.path.join(output, "base.yaml"),
        "corrupted_wrong_answers": wrong,
    }  # fmt: skip
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="directory to write (kept as it is when its demo.json exists)")
    p.add_argument("--samples", type=int, default=240, help="samples of each source (default 240)")
    p.add_argument("--questions", type=int, default=60, help="benchmark questions (default 60)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    summary = build(args.output, args.samples, args.questions, args.seed)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
