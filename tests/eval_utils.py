"""A small trained checkpoint and benchmark files for the evaluation tests.

The checkpoint: the tiny SAIL-VL config (examples/configs/tiny.yaml, 1 ViT layer, 2 LLM layers) trained by
pretrain_vlm.py for 30 steps (about 20 s of CPU, under a minute on 2 shared cores) on pictures filled with
one colour ("What colour is this picture?" -> "red") and counting questions. Half trained: its answers
depend on the picture and the question and its logits are far from one-hot, like an early checkpoint
being evaluated, which is where batch-size effects show.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
from fixtures.multimodal_data import conversation, make_tiny_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (235, 200, 20),
           "black": (20, 20, 20), "white": (240, 240, 240)}  # fmt: skip
QUESTIONS = ["Colour?", "Name the colour.", "What colour is this picture?",
             "Which colour fills this image? Answer in one word."]  # fmt: skip
TRAIN_STEPS = 30


def write_colour_image(path: Path, colour: str, seed: int) -> None:
    """A small noisy picture of one colour (24-64 px a side: one 448 px tile)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = (int(x) for x in rng.integers(24, 65, 2))
    pixels = np.array(COLOURS[colour])[None, None] + rng.normal(0, 20, (height, width, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def make_colour_dataset(root: Path, samples: int = 400) -> str:
    """Preprocessed training data (three colour questions to one counting question); returns the prefix."""
    from megasail.data.preprocess import PreprocessConfig, run_preprocess

    rng = random.Random(0)
    records = []
    for i in range(samples):
        if i % 4 == 3:
            n = rng.randint(1, 6)
            records.append(
                conversation(None, f"Count to {n}.", " ".join(map(str, range(1, n + 1))), id=f"t{i}")
            )
            continue
        colour = rng.choice(list(COLOURS))
        write_colour_image(root / "images" / f"c{i}.png", colour, seed=i)
        records.append(conversation(f"c{i}.png", "<image>\n" + rng.choice(QUESTIONS), colour, id=f"c{i}"))
    tokenizer = make_tiny_tokenizer(str(root / "tokenizer"))
    write_jsonl(str(root / "train.jsonl"), records)
    run_preprocess(PreprocessConfig(inputs=[str(root / "train.jsonl")], output_prefix=str(root / "train"),
                                    tokenizer=tokenizer, image_root=str(root / "images"), max_tiles=1,
                                    progress=False))  # fmt: skip
    return str(root / "train")


def train_colour_checkpoint(root: Path, steps: int = TRAIN_STEPS) -> Path:
    """Train the tiny config on make_colour_dataset with pretrain_vlm.py; returns the checkpoint root."""
    prefix = make_colour_dataset(root / "data")
    ckpt = root / "ckpt"
    proc = subprocess.run(
        [sys.executable, "pretrain_vlm.py", "--config", "examples/configs/tiny.yaml", f"data.path={prefix}",
         f"train.iters={steps}", "data.seq_length=512", "data.global_batch_size=4", "data.num_workers=0",
         "data.max_tiles=1", "data.pack_window=8", "data.pack_chunk_samples=32", "model.vision.num_layers=1",
         "model.language.num_layers=2", "optim.warmup_steps=0", "optim.lr=3e-3", "optim.min_lr=1e-3",
         "logging.wandb=false", f"logging.dir={root / 'logs'}", f"checkpoint.save={ckpt}"],
        cwd=REPO, env=tool_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ckpt


def write_colour_benchmark(root: Path, questions: int = 24, seed: int = 1) -> Path:
    """root/colours.jsonl (metric vqa) over new pictures: one-picture questions of four lengths, counting
    questions without a picture, two-picture questions, one picture that does not exist and one that is
    cut short (decodes to nothing)."""
    rng = random.Random(seed)
    lines = []
    for i in range(questions):
        colour = rng.choice(list(COLOURS))
        if i % 6 == 5:
            n = rng.randint(1, 6)
            lines.append(
                {
                    "id": f"count{i}",
                    "question": f"Count to {n}.",
                    "answers": [" ".join(map(str, range(1, n + 1)))] * 10,
                }
            )
            continue
        names = [f"images/q{i}.png"] + ([f"images/q{i}b.png"] if i % 6 == 4 else [])
        for k, name in enumerate(names):
            write_colour_image(root / name, colour, seed=1000 * seed + 10 * i + k)
        lines.append({"id": f"q{i}", "image": names if len(names) > 1 else names[0],
                      "question": rng.choice(QUESTIONS), "answers": [colour] * 10})  # fmt: skip
    write_colour_image(root / "images" / "cut.png", "red", seed=7)
    data = (root / "images" / "cut.png").read_bytes()
    (root / "images" / "cut.png").write_bytes(data[: len(data) // 2])
    lines.append({"id": "cut", "image": "images/cut.png", "question": "Colour?", "answers": ["red"] * 10})
    lines.insert(
        3, {"id": "gone", "image": "images/nowhere.png", "question": "Colour?", "answers": ["red"] * 10}
    )
    lines[0]["metric"] = "vqa"
    path = root / "colours.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def tool_env(**extra) -> dict:
    """A fresh shell's environment: no rendezvous variables of in-process tests."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK")}  # fmt: skip
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
               OMP_NUM_THREADS="1", **extra)  # fmt: skip
    return env


def evaluate_cmd(*args, nproc: int = 1, port: int | None = None) -> list[str]:
    tool = str(REPO / "tools" / "evaluate.py")
    if nproc == 1:
        return [sys.executable, tool, *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(port), tool, *map(str, args)]  # fmt: skip


def run_evaluate_tool(*args, nproc: int = 1, port: int | None = None, timeout: int = 600):
    return subprocess.run(evaluate_cmd(*args, nproc=nproc, port=port), capture_output=True, text=True,
                          timeout=timeout, env=tool_env(), cwd=REPO)  # fmt: skip


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def by_id(path) -> dict[str, dict]:
    return {str(r["id"]): r for r in read_jsonl(path)}


TIED_CHARS = (";", "Q")  # the tied pair: ';' is frequent in the tiny captioner's answers, 'Q' is not


def tied_token_model_dir(directory: Path) -> Path:
    """The recaptioning tests' tiny HF captioner (answers of 1-20 byte tokens) with the lm_head row of 'Q'
    made equal to that of ';': whenever either is the top token the two top logits are equal, so an
    answer holds a near-tie exactly when it holds ';' or 'Q' (anywhere in it)."""
    import torch
    from chat_utils import chatty_hf_model, save_chat_dir
    from recaption_utils import IM_END_ID, STOP_AFTER_TOKEN
    from tokenizers import Tokenizer

    model = chatty_hf_model()
    save_chat_dir(model, directory)  # writes tokenizer.json, read back for the two ids
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    first, second = (tokenizer.token_to_id(c) for c in TIED_CHARS)
    with torch.no_grad():
        head = model.lm_head.weight
        head[IM_END_ID].copy_(1.02 * head[STOP_AFTER_TOKEN])
        head[second].copy_(head[first])
    save_chat_dir(model, directory)
    return directory


def write_open_questions(root: Path, images: list[str]) -> Path:
    """root/open.jsonl (metric anls): twelve questions without a picture and the same with one."""
    questions = ["What is this?", "Describe it.", "Why?", "Tell me more about the picture.", "Count the things.",
                 "Is it big?", "Where is it?", "Who made it?", "Name it.", "How many?", "What colour?", "Explain."]  # fmt: skip
    lines = []
    for i, question in enumerate(questions * 2):
        line = {"id": f"open{i}", "question": question, "answers": ["something"], "metric": "anls"}
        if i >= len(questions):
            line["image"] = images[i % len(images)]
        lines.append(line)
    path = root / "open.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
