#!/usr/bin/env python
"""Chat with a megasail checkpoint (or a HuggingFace InternVL / SAIL-VL directory).

    python tools/chat.py --load ckpt/ --image cat.jpg --prompt "What is in the picture?"
    python tools/chat.py --load ckpt/ --image cat.jpg --interactive
    python tools/chat.py --load ckpt/ --batch-jsonl questions.jsonl --output answers.jsonl
    torchrun --nproc-per-node 2 tools/chat.py --load ckpt/ --tensor-parallel 2 --prompt "..."

Prompts go through the chat template and InternVL dynamic tiling the checkpoint's training data was
prepared with: the template its samples were rendered with (a checkpoint trained on image-caption
data only gets the caption template, whose prompt is the images alone: the question text is not
used), the system message and tile limits of the dataset manifest; --template, --system and
--max-tiles override them. A HuggingFace directory names its template and tiling in config.json
("template", "max_dynamic_patch"), as megasail's exports do.

Only the answer is printed (rank 0); tokens/s goes to the log (stderr). Batch input: one JSON object
per line with "prompt" (or "question"), optional "images" (paths; a relative path is relative to the
directory of the JSONL file) and "id". Each output line, in input order, has "id" (the input's, or
the line's 0-based index among non-empty lines), "answer", "token_ids", "stopped"; a line that could
not be answered has "id", "line" (its line number in the file) and "error" instead, and the exit
status is 1. A checkpoint that cannot be opened (no config.json in a HuggingFace directory, no
megasail checkpoint) is one "error:" line and exit status 2.
--bench times 64 new tokens with and without the KV cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

log = logging.getLogger("chat")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--load", required=True, help="megasail checkpoint dir (root or iter_*) or a HuggingFace dir"
    )
    p.add_argument("--image", action="append", default=[], help="image file for the prompt (repeatable)")
    p.add_argument("--prompt", help="the question")
    p.add_argument(
        "--interactive", action="store_true", help="keep a conversation on stdin (/reset clears it)"
    )
    p.add_argument(
        "--batch-jsonl",
        help="answer every prompt of this JSONL file (see above; image paths relative to its directory)",
    )
    p.add_argument("--output", help="where --batch-jsonl answers go (JSONL)")
    p.add_argument(
        "--batch-size", type=int, default=8, help="prompts generated together in --batch-jsonl mode"
    )
    p.add_argument("--max-new-tokens", type=int, default=512, help="most tokens generated per answer")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    mode.add_argument("--temperature", type=float, help="sample with this temperature (with --top-p)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the checkpoint's)")
    p.add_argument(
        "--template",
        help="prompt template: sailvl-chat, internvl2_5, caption (default: the template the checkpoint's "
        "training data was rendered with; caption for image-caption data only)",
    )
    p.add_argument("--system", help="system message (default: the template's)")
    p.add_argument(
        "--max-tiles", type=int, help="most tiles per image (default: the checkpoint's data setting)"
    )
    p.add_argument(
        "--tensor-parallel", type=int, default=1, help="tensor-parallel size (launch with torchrun)"
    )
    p.add_argument(
        "--pipeline-parallel", type=int, default=1, help="pipeline-parallel size (launch with torchrun)"
    )
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument(
        "--transformer-impl",
        default="local",
        choices=("local", "te"),
        help="layers to build; padded batches need local attention",
    )
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--bench", action="store_true", help="time 64 new tokens with and without the KV cache")
    args = p.parse_args(argv)
    if sum(bool(x) for x in (args.prompt and not args.interactive, args.interactive, args.batch_jsonl)) != 1:
        p.error("give exactly one of --prompt, --interactive or --batch-jsonl")
    if args.batch_jsonl and not args.output:
        p.error("--batch-jsonl needs --output")
    if args.template is not None:
        from megasail.data.text.template import TEMPLATES

        if args.template not in TEMPLATES:
            p.error(f"--template {args.template!r}: choose from {', '.join(sorted(TEMPLATES))}")
    return args


class Chat:
    """A loaded model plus its prompt settings; ``answer`` runs one batch."""

    def __init__(self, args):
        from dataclasses import replace

        from megasail.inference import Generator, SamplingParams, pad_token_id, stop_token_ids
        from megasail.inference.loading import load_for_generation

        loaded = load_for_generation(
            args.load,
            tokenizer=args.tokenizer,
            precision=args.precision,
            transformer_impl=args.transformer_impl,
        )
        self.tokenizer = loaded.tokenizer
        self.prompt = replace(
            loaded.prompt,
            **{
                k: v
                for k, v in (
                    ("template", args.template),
                    ("system_message", args.system),
                    ("max_tiles", args.max_tiles),
                )
                if v is not None
            },
        )
        log.info(
            "prompt template %r, %d-%d tiles per image",
            self.prompt.template,
            self.prompt.min_tiles,
            self.prompt.max_tiles,
        )
        if self.prompt.template == "caption":
            log.warning("the caption template's prompt is the images alone: question text is not used")
        self.generator = Generator(loaded.model, pad_token_id=pad_token_id(self.tokenizer))
        self.params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            greedy=args.temperature is None,
            temperature=args.temperature or 1.0,
            top_p=args.top_p,
            seed=args.seed,
            stop_token_ids=stop_token_ids(self.tokenizer),
        )
        self.use_cache = not args.no_cache

    def request(self, question: str, images: list[bytes], history=()):
        from megasail.inference import Request, build_prompt

        ids, pixels = build_prompt(self.tokenizer, self.prompt, question, images, history)
        return Request(ids, pixels)

    def answer(self, requests, params=None, use_cache=None):
        params = params or self.params
        start = time.perf_counter()
        results = self.generator.generate(
            requests, params, use_cache=self.use_cache if use_cache is None else use_cache
        )
        stats = results[0].stats
        log.info(
            "%d prompt(s), %d prompt tokens, %d new tokens in %.2f s: %.1f tokens/s (prefill %.2f s)",
            len(requests),
            stats.prompt_tokens,
            stats.new_tokens,
            time.perf_counter() - start,
            stats.tokens_per_s,
            stats.prefill_s,
        )
        return results

    def text(self, result) -> str:
        stop = set(self.params.stop_token_ids)
        return self.tokenizer.decode([t for t in result.token_ids if t not in stop])


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def run_batch(chat: Chat, args, is_main: bool) -> int:
    """Answer a JSONL of prompts in batches; returns the number of lines that failed."""
    from tqdm import tqdm

    with open(args.batch_jsonl) as f:
        lines = [(number, line) for number, line in enumerate(f, start=1) if line.strip()]
    base = os.path.dirname(os.path.abspath(args.batch_jsonl))  # relative image paths start here
    failed = 0
    pending: list[tuple[int, object]] = []
    items: dict[int, dict] = {}
    out: list[dict | None] = [None] * len(lines)
    for n, (number, line) in enumerate(lines):
        item = None
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("not a JSON object")
            question = item.get("prompt", item.get("question"))
            if not isinstance(question, str):
                raise ValueError('no "prompt" string')
            images = [_read(p if os.path.isabs(p) else os.path.join(base, p)) for p in item.get("images", [])]
            pending.append((n, chat.request(question, images)))
            items[n] = item
        except Exception as e:  # noqa: BLE001 - a bad line is reported in the output, never dropped
            failed += 1
            given = item.get("id", n) if isinstance(item, dict) else n
            out[n] = {"id": given, "line": number, "error": f"{type(e).__name__}: {e}"}
            log.warning("%s:%d: %s", args.batch_jsonl, number, out[n]["error"])
    bar = tqdm(total=len(pending), desc="answering", unit="prompt", disable=not is_main)
    for start in range(0, len(pending), args.batch_size):
        chunk = pending[start : start + args.batch_size]
        for (n, _), result in zip(chunk, chat.answer([r for _, r in chunk]), strict=True):
            out[n] = {
                "id": items[n].get("id", n),
                "answer": chat.text(result),
                "token_ids": result.token_ids,
                "stopped": result.stopped,
            }
        bar.update(len(chunk))
    bar.close()
    if is_main:
        with open(args.output, "w") as f:
            for rec in out:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        log.info("%d answers -> %s (%d failed lines)", len(pending), args.output, failed)
    return failed


def run_bench(chat: Chat, request) -> str:
    """One line: 64 new tokens (stop tokens ignored) with and without the KV cache."""
    from dataclasses import replace

    params = replace(chat.params, max_new_tokens=64, stop_token_ids=())
    timings = {}
    for cache in (True, False):
        chat.answer([request], params, use_cache=cache)  # warm-up
        start = time.perf_counter()
        chat.answer([request], params, use_cache=cache)
        timings[cache] = time.perf_counter() - start
    return (
        f"bench: {len(request.input_ids)} prompt tokens, 64 new tokens: KV cache {64 / timings[True]:.1f} tokens/s "
        f"({timings[True]:.2f} s), no cache {64 / timings[False]:.1f} tokens/s ({timings[False]:.2f} s), "
        f"speedup {timings[False] / timings[True]:.2f}x"
    )


def _stdin_lines(is_main: bool):
    """Lines of rank 0's stdin, on every rank (all ranks of a model-parallel group generate together)."""
    import torch.distributed as dist

    while True:
        box = [sys.stdin.readline() if is_main else None]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        if not box[0]:
            return
        yield box[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    import torch.distributed as dist

    from megasail import runtime
    from megasail.inference.loading import checkpoint_kind

    try:
        checkpoint_kind(args.load)
    except FileNotFoundError as e:  # the user's path, not a bug: one line, no traceback
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    runtime.initialize(args.tensor_parallel, args.pipeline_parallel, seed=args.seed)
    is_main = dist.get_rank() == 0
    try:
        chat = Chat(args)
        if args.batch_jsonl:
            return 1 if run_batch(chat, args, is_main) else 0
        images = [_read(p) for p in args.image]
        if args.bench:
            line = run_bench(chat, chat.request(args.prompt, images))
            if is_main:
                print(line, flush=True)
            return 0
        if not args.interactive:
            text = chat.text(chat.answer([chat.request(args.prompt, images)])[0])
            if is_main:
                print(text, flush=True)
            return 0
        history: list[tuple[str, str]] = []
        for line in _stdin_lines(is_main):
            question = line.rstrip("\n")
            if question.strip() == "/reset":
                history = []
                continue
            if not question.strip():
                continue
            text = chat.text(chat.answer([chat.request(question, images, history)])[0])
            history.append((question, text))
            if is_main:
                print(text, flush=True)
        return 0
    finally:
        runtime.destroy()


if __name__ == "__main__":
    sys.exit(main())
