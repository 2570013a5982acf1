"""A tiny captioning model and image sources for the recaptioning tests.

The model is chat_utils' random InternVL whose <|im_end|> logit row is 1.02x that of one byte token,
so greedy captions stop about where that token would have come: after 1 to 20 tokens, or not
within --max-new-tokens. A run then keeps some captions and filters others (too short, truncated).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from chat_utils import SPECIALS, chatty_hf_model, png_bytes, save_chat_dir

REPO = Path(__file__).resolve().parents[1]
STOP_AFTER_TOKEN = 50  # a byte token the random model produces after 0 to 30 tokens, varying by image
IM_END_ID = 256 + SPECIALS.index("<|im_end|>")
SIZES = [(40, 40), (120, 60), (60, 120), (200, 50), (90, 90), (56, 112)]  # 1 to 5 tiles at 56 px


def captioning_hf_model():
    """The tiny captioning model as a transformers InternVLForConditionalGeneration (the oracle)."""
    model = chatty_hf_model()
    with torch.no_grad():
        head = model.lm_head.weight
        head[IM_END_ID].copy_(1.02 * head[STOP_AFTER_TOKEN])
    return model


def captioning_model_dir(directory: Path) -> Path:
    """Save the tiny captioning model (HF layout + byte tokenizer) into ``directory``."""
    save_chat_dir(captioning_hf_model(), directory)
    return directory


def write_image_set(root: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` PNGs of mixed tile counts under root (some in a subfolder); their relative paths."""
    names = []
    for i in range(count):
        name = f"{'sub/' if i % 3 == 0 else ''}img{i:03d}.png"
        width, height = SIZES[i % len(SIZES)]
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png_bytes(width, height, seed=seed * 1000 + i))
        names.append(name)
    return names


def tool_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def recaption_cmd(*args, nproc: int = 1, port: int | None = None) -> list[str]:
    tool = str(REPO / "tools" / "recaption.py")
    if nproc == 1:
        return [sys.executable, tool, *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(port), tool, *map(str, args)]  # fmt: skip


def run_recaption_tool(*args, nproc: int = 1, port: int | None = None, timeout: int = 300, **env):
    return subprocess.run(recaption_cmd(*args, nproc=nproc, port=port), capture_output=True, text=True,
                          timeout=timeout, env=tool_env(**env), cwd=REPO)  # fmt: skip


def output_lines(out_dir: Path) -> dict[str, list[dict]]:
    """kind -> every line of captions-*/filtered*/rejects* (parsed)."""
    lines = {}
    for kind, pattern in (("captions", "captions-*.jsonl"), ("filtered", "filtered*.jsonl"),
                          ("rejects", "rejects*.jsonl")):  # fmt: skip
        lines[kind] = [json.loads(x) for p in sorted(out_dir.glob(pattern)) for x in p.read_text().splitlines()]
    return lines


def id_placement(out_dir: Path) -> Counter:
    """(id, kind) occurrences over the three outputs."""
    return Counter((line["id"], kind) for kind, lines in output_lines(out_dir).items() for line in lines)
