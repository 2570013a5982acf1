"""Tiny real datasets and run configs for the training tests (a few seconds per step on 2 CPU cores).

Datasets go through the real preprocessing (tokenizer, images, manifest), so training reads them
with the real loader and takes the vocabulary and <IMG_CONTEXT> id from their manifests.
"""

from __future__ import annotations

import os

from fixtures.multimodal_data import (
    conversation,
    good_conversation_records,
    image_bytes,
    make_tiny_tokenizer,
    write_images,
    write_jsonl,
)

from megasail.config import load_config
from megasail.data.loader.config import SourceConfig, StageConfig
from megasail.data.preprocess import PreprocessConfig, run_preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(REPO, "examples", "configs", "tiny.yaml")


def make_dataset(root: str, name: str, n: int, seed: int, tokenizer: str | None = None) -> str:
    """Preprocess n conversations (two of three with a small image) into root/name; returns the prefix."""
    tokenizer = tokenizer or make_tiny_tokenizer(os.path.join(root, "tokenizer"))
    images = {
        f"{name}_{i}.jpg": image_bytes("JPEG", 40 + 8 * (i % 5), 32 + 6 * (i % 4), seed=seed * 100 + i)
        for i in range(6)
    }
    write_images(os.path.join(root, "images"), images)
    records = good_conversation_records(n, list(images))
    records += [conversation(None, f"Say {k} twice.", f"{k} {k}", id=f"x{k}") for k in range(n // 4)]
    jsonl = write_jsonl(os.path.join(root, f"{name}.jsonl"), records)
    prefix = os.path.join(root, name)
    run_preprocess(
        PreprocessConfig(
            inputs=[jsonl],
            output_prefix=prefix,
            tokenizer=tokenizer,
            image_root=os.path.join(root, "images"),
            max_tiles=1,
            progress=False,
        )
    )
    return prefix


def make_datasets(root: str, vocab_size: int = 400) -> dict[str, str]:
    """Two prefixes made with one tokenizer: 'a' (alignment stage) and 'b' (advance stage)."""
    tokenizer = make_tiny_tokenizer(os.path.join(root, "tokenizer"), vocab_size=vocab_size)
    return {"a": make_dataset(root, "a", 48, 1, tokenizer), "b": make_dataset(root, "b", 48, 2, tokenizer)}


def tiny_run_config(overrides: list[str] | None = None, **data):
    """examples/configs/tiny.yaml with test-sized data settings (in-process loading, short sequences)."""
    base = [
        "data.seq_length=512",
        "data.global_batch_size=4",
        "data.micro_batch_size=1",
        "data.num_workers=0",
        "data.max_tiles=1",
        "data.pack_window=8",
        "data.pack_chunk_samples=32",
        "logging.wandb=false",
        "optim.warmup_steps=0",
        "model.vision.num_layers=1",
        "model.language.num_layers=2",
    ]
    cfg = load_config(TINY_YAML, base + list(overrides or []))
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def two_stages(prefixes: dict, budget_samples: int = 16) -> list[StageConfig]:
    """Alignment (projector only, budget_samples) over 'a', then advance (vision + projector) over 'b'."""
    return [
        StageConfig(
            name="align",
            sources=[SourceConfig(prefixes["a"])],
            budget_samples=budget_samples,
            trainable=["projector"],
        ),
        StageConfig(
            name="advance",
            sources=[SourceConfig(prefixes["b"])],
            budget_samples=10_000,
            trainable=["vision", "projector"],
        ),
    ]
