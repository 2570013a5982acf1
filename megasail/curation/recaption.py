"""Recaption images at scale with a megasail checkpoint: split, prompt, generate, filter, commit, resume.

Every rank runs ``run_recaption`` (``megasail.runtime.initialize(tp, pp)`` first). The ranks of a
tensor/pipeline-parallel group generate together (``megasail.inference.batched``); each group is one
data-parallel writer and captions the images whose id hashes to its data-parallel rank
(``split.shard_of``), so every image is captioned by exactly one writer at any DP size. Writers never
wait for each other while they generate; the only collectives across them are at the start (checks,
resume) and at the end (the summary), on a gloo group without a practical timeout, since writers
may finish hours apart.

Every input id ends in exactly one of ``captions-*.jsonl`` (kept), ``filtered-*.jsonl`` (with the
filter's reason) or ``rejects-*.jsonl`` (the image or its record could not be read or decoded, after
one retry). See docs/curation.md, "Recaptioning".
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import torch.distributed as dist
from megatron.core import parallel_state

from megasail.curation.filters import FILTER_REASONS, FilterConfig, filter_reason
from megasail.curation.prompts import load_prompt_bank
from megasail.curation.sources import ImageRecord, open_source
from megasail.curation.split import shard_of
from megasail.curation.writer import (
    OutputWriter,
    read_done_ids,
    read_progress,
    total_counts,
    truncate_to_committed,
)
from megasail.data.images.formats import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from megasail.inference.batched import BatchedGenerator, BatchingConfig, ItemOutcome, WorkItem

log = logging.getLogger("recaption")
RUN_FILE = "recaption.json"
# run settings that must not change on --resume (they decide which prompt and caption an image gets)
_RESUME_KEYS = ("images", "image_root", "kind", "prompts", "seed", "model", "max_tiles")


class RecaptionError(RuntimeError):
    """A run that cannot start as asked (output exists, settings changed on resume, duplicate ids)."""


@dataclass
class RecaptionConfig:
    load: str
    images: str
    output: str
    prompt_bank: str | None = None
    batch_size: int = 16
    max_new_tokens: int = 256
    max_tiles: int = 6
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    image_root: str | None = None
    model_name: str | None = None
    tokenizer: str | None = None
    template: str | None = None
    system: str | None = None
    precision: str | None = None
    transformer_impl: str = "local"
    decode_backend: str = "auto"
    temperature: float | None = None
    top_p: float = 1.0
    bucket: bool = True
    prefetch_batches: int = 2
    fsync: bool = True
    progress: bool = True
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    filters: FilterConfig = field(default_factory=FilterConfig)


def _world_group():
    """A gloo group over all ranks whose collectives wait as long as a writer may take."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30))


def _all_ok(group, error: str | None) -> None:
    """Raise on every rank when any rank failed a start-up step (no rank is left waiting)."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=group)
    first = next((e for e in errors if e), None)
    if first:
        raise RecaptionError(first)


def _run_settings(cfg: RecaptionConfig, source, bank, model_name: str) -> dict:
    return {
        "images": os.path.abspath(cfg.images) if os.path.exists(cfg.images) else cfg.images,
        "image_root": source.image_root,
        "kind": source.kind,
        "prompts": [asdict(p) for p in bank.prompts],
        "seed": cfg.seed,
        "model": model_name,
        "max_tiles": cfg.max_tiles,
        "max_new_tokens": cfg.max_new_tokens,
        "load": os.path.abspath(cfg.load),
    }


def _check_output(cfg: RecaptionConfig, settings: dict) -> str | None:
    """Why this run may not write into cfg.output (None if it may); read-only, the same on every rank."""
    out = cfg.output
    existing = os.path.isdir(out) and any(
        n.endswith((".jsonl", ".json")) for n in os.listdir(out)
    )
    if not existing or cfg.overwrite:
        return None
    if not cfg.resume:
        return f"{out} already holds recaptioning output: pass --resume to continue it or --overwrite to start over"
    run_file = os.path.join(out, RUN_FILE)
    if not os.path.isfile(run_file):
        return f"{out} holds output but no {RUN_FILE}: not a recaptioning run this tool can resume"
    with open(run_file) as f:
        previous = json.load(f)
    changed = [k for k in _RESUME_KEYS if previous.get(k) != settings.get(k)]
    if changed:
        return (f"--resume: {', '.join(changed)} differ from the run in {out} "
                f"(was {', '.join(f'{k}={previous.get(k)!r}' for k in changed)[:400]}); "
                "resume with the same settings, or recaption into a new output directory")
    return None


def _prepare_output(cfg: RecaptionConfig, settings: dict) -> int:
    """Rank 0: make the output directory ready to append to; returns uncommitted bytes dropped."""
    if cfg.overwrite and os.path.isdir(cfg.output):
        for name in os.listdir(cfg.output):
            if name.endswith((".jsonl", ".json", ".tmp")):
                os.remove(os.path.join(cfg.output, name))
    os.makedirs(cfg.output, exist_ok=True)
    dropped = truncate_to_committed(cfg.output)
    tmp = os.path.join(cfg.output, RUN_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=1)
    os.replace(tmp, os.path.join(cfg.output, RUN_FILE))
    return dropped


def _list_shard(source, want) -> tuple[int, str | None]:
    """(images in this writer's shard, an error naming a duplicate id if any)."""
    seen: dict[str, str] = {}
    for item_id, location in source.ids(want):
        if item_id in seen:
            return len(seen), (f"duplicate image id {item_id!r} at {seen[item_id]} and {location}: ids must be "
                               "unique (the JSONL 'id' field, else the image path)")
        seen[item_id] = location
    return len(seen), None


class _Outcomes:
    """Turns outcomes and broken records into output lines and counts."""

    def __init__(self, bank, filters: FilterConfig, model_name: str, tokenizer):
        self.bank = bank
        self.filters = filters
        self.model = model_name
        self.tokenizer = tokenizer

    def reject(self, record: ImageRecord, reason: str, message: str, attempts: int) -> dict:
        line = {"id": record.id, "image": record.image, "reason": reason, "message": message, "attempts": attempts}
        return {**line, **record.carried}

    def lines(self, outcome: ItemOutcome) -> tuple[str, dict, str]:
        """(output kind, line, count key) for one outcome."""
        record, prompt = outcome.item.payload
        if outcome.result is None:
            line = self.reject(record, outcome.error_reason, outcome.error_message, outcome.attempts)
            return "rejects", line, f"rejected:{outcome.error_reason}"
        stop = set(outcome.result.token_ids[-1:]) if outcome.result.stopped else set()
        num_tokens = len(outcome.result.token_ids) - len(stop)
        caption = outcome.text.strip()
        reason = filter_reason(caption, num_tokens, outcome.result.stopped, self.filters,
                               prompt.min_tokens, prompt.max_tokens)  # fmt: skip
        line = {"id": record.id, "image": record.image, "caption": caption, "prompt_id": prompt.id,
                "model": self.model, "caption_tokens": num_tokens}  # fmt: skip
        if reason is None:
            return "captions", {**line, **record.carried}, "kept"
        return "filtered", {**line, "reason": reason, **record.carried}, f"filtered:{reason}"


def _summary_table(run: Counter, total: Counter, elapsed: float, writers: int) -> str:
    rows = [("kept", "kept")]
    rows += [(f"filtered: {r}", f"filtered:{r}") for r in FILTER_REASONS]
    rejected = sorted({k.split(":", 1)[1] for k in (*run, *total) if k.startswith("rejected:")})
    rows += [(f"rejected: {r}", f"rejected:{r}") for r in rejected]
    done = sum(v for k, v in run.items() if k != "already_done")
    lines = ["| outcome | this run | whole output |", "| --- | --- | --- |"]
    lines += [f"| {name} | {run.get(key, 0)} | {total.get(key, 0)} |" for name, key in rows]
    lines.append(f"| images | {done} | {sum(total.values())} |")
    rate = done / elapsed if elapsed > 0 else 0.0
    lines.append(f"| images/s | {rate:.2f} ({writers} writer(s), {elapsed:.1f} s) | |")
    return "\n".join(lines)


def run_recaption(cfg: RecaptionConfig) -> dict | None:
    """Caption this rank's share; returns the summary on global rank 0 (None elsewhere)."""
    from megasail.inference import Generator, SamplingParams, pad_token_id, stop_token_ids
    from megasail.inference.loading import load_for_generation

    group = _world_group()
    rank = dist.get_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    error, source, bank = None, None, None
    model_name = cfg.model_name or os.path.basename(os.path.normpath(cfg.load))
    try:
        source = open_source(cfg.images, cfg.image_root, cfg.max_image_bytes)
        bank = load_prompt_bank(cfg.prompt_bank, cfg.seed)
        settings = _run_settings(cfg, source, bank, model_name)
        error = _check_output(cfg, settings)
    except ValueError as e:  # SourceError, PromptBankError: the message says what to fix
        error = str(e)
    _all_ok(group, error)
    dropped = _prepare_output(cfg, settings) if rank == 0 else 0
    dist.barrier(group=group)  # output truncated to its committed state before anyone reads it
    if dropped:
        log.info("resume: dropped %d uncommitted bytes of an interrupted batch", dropped)

    loaded = load_for_generation(cfg.load, tokenizer=cfg.tokenizer, precision=cfg.precision,
                                 transformer_impl=cfg.transformer_impl)  # fmt: skip
    overrides = {"max_tiles": cfg.max_tiles, "decode_backend": cfg.decode_backend}
    overrides.update({k: v for k, v in (("template", cfg.template), ("system_message", cfg.system)) if v is not None})
    prompt_settings = replace(loaded.prompt, **overrides)
    tokenizer = loaded.tokenizer
    pad = pad_token_id(tokenizer)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, greedy=cfg.temperature is None,
                            temperature=cfg.temperature or 1.0, top_p=cfg.top_p, seed=cfg.seed,
                            stop_token_ids=stop_token_ids(tokenizer))  # fmt: skip
    batching = BatchingConfig(batch_size=cfg.batch_size, bucket=cfg.bucket, prefetch_batches=cfg.prefetch_batches,
                              max_image_pixels=cfg.max_image_pixels)  # fmt: skip
    batched = BatchedGenerator(Generator(loaded.model, pad_token_id=pad), tokenizer, prompt_settings, params, batching)

    def mine(item_id: str) -> bool:
        return shard_of(item_id, dp_size) == dp_rank

    todo, error, done = 0, None, set()
    if batched.is_source:
        done = read_done_ids(cfg.output, mine)
        listed, error = _list_shard(source, mine)
        todo = listed - len(done)
    _all_ok(group, error)

    run_counts: Counter = Counter(already_done=len(done))
    start = time.perf_counter()
    if batched.is_source:
        run_counts.update(_caption_shard(cfg, source, bank, batched, tokenizer, model_name, dp_rank, dp_size,
                                         todo, lambda i: mine(i) and i not in done))  # fmt: skip
    else:
        for _ in batched.run(None):
            pass
    elapsed = time.perf_counter() - start

    reports = [None] * dist.get_world_size()
    mine_report = (dict(run_counts), elapsed) if batched.is_source else None
    dist.all_gather_object(reports, mine_report, group=group)  # waits for the slowest writer
    if rank != 0:
        return None
    run_total: Counter = Counter()
    for report in reports:
        if report is not None:
            run_total.update(report[0])
    wall = max(r[1] for r in reports if r is not None)
    total = total_counts(cfg.output)
    table = _summary_table(run_total, total, wall, dp_size)
    summary = {"run": dict(run_total), "whole_output": dict(total), "seconds": wall, "writers": dp_size,
               "images_per_s": sum(v for k, v in run_total.items() if k != "already_done") / max(wall, 1e-9),
               "image_root": source.image_root, "kind": source.kind}  # fmt: skip
    with open(os.path.join(cfg.output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"recaption summary ({cfg.output}; {run_total.get('already_done', 0)} done before this run)", flush=True)
    print(table, flush=True)
    print(f"train on them: python tools/preprocess_data.py --input '{cfg.output}/captions-*.jsonl' "
          f"--image-root {source.image_root} --tokenizer TOKENIZER --output-prefix PREFIX", flush=True)
    if source.kind == "tar":
        print("(images are SHARD#MEMBER: preprocessing reads members of uncompressed .tar shards by name)", flush=True)
    summary["table"] = table
    return summary


def _caption_shard(cfg, source, bank, batched, tokenizer, model_name, dp_rank, dp_size, todo, want) -> Counter:
    """Caption this writer's remaining images; returns this run's counts."""
    from tqdm import tqdm

    writer = OutputWriter(cfg.output, dp_rank, fsync=cfg.fsync)
    outcomes = _Outcomes(bank, cfg.filters, model_name, tokenizer)
    broken: collections.deque = collections.deque()  # records that never reach the model (filled ahead)
    run_counts: Counter = Counter()

    def items():
        for record in source.records(want):
            if record.error is not None:
                broken.append(record)
                continue
            prompt = bank.choose(record.id)
            yield WorkItem(record.id, prompt.text, lambda read=record.read: [read()], (record, prompt))

    bar = tqdm(total=todo, unit="img", desc=f"recaption (writer {dp_rank} of {dp_size})", dynamic_ncols=True,
               disable=not cfg.progress or dp_rank != 0, file=sys.stderr)  # fmt: skip

    def commit(batch: list[ItemOutcome]) -> None:
        lines = {"captions": [], "filtered": [], "rejects": []}
        counts: Counter = Counter()
        for outcome in batch:
            kind, line, key = outcomes.lines(outcome)
            lines[kind].append(line)
            counts[key] += 1
        while broken:
            record = broken.popleft()
            lines["rejects"].append(outcomes.reject(record, *record.error, attempts=1))
            counts[f"rejected:{record.error[0]}"] += 1
        writer.commit(lines, counts)
        run_counts.update(counts)
        bar.update(sum(counts.values()))
        bar.set_postfix(kept=run_counts["kept"], filtered=sum(v for k, v in run_counts.items() if k[0] == "f"),
                        rejected=sum(v for k, v in run_counts.items() if k[0] == "r"), refresh=False)  # fmt: skip

    try:
        for batch in batched.run(items()):
            commit(batch)
        if broken:
            commit([])
    finally:
        bar.close()
        writer.close()
    return run_counts


def progress_of(out_dir: str) -> dict[int, dict]:
    """Each writer's committed progress (for tools and tests)."""
    return read_progress(out_dir)
