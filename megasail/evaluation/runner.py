"""Score a checkpoint on local benchmark files: generate, write predictions as batches finish, score.

Every rank runs ``run_evaluation`` (``megasail.runtime.initialize(tp, pp)`` first). The ranks of a
tensor/pipeline-parallel group generate together (``megasail.inference.batched``: bucketed, left-padded,
KV-cached batches); each group is a data-parallel writer and answers the questions whose id hashes to
its data-parallel rank (``megasail.curation.split.shard_of``), appending each finished batch to
``NAME.partial-W.jsonl``. Global rank 0 checks the output directory and hands every writer the ids
already predicted there (a rerun skips them), and at the end gathers the writers' new records, writes
``NAME.predictions.jsonl`` / ``NAME.errors.jsonl`` and ``scores.json``, and prints the table.

``rescore`` scores a predictions directory again without a model (the same scores.json).
Nothing here depends on the batch size or the data-parallel size except speed: see docs/curation.md,
"Batch and data-parallel independence".
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace

from megasail.evaluation.benchmarks import format_prompt, load_benchmark
from megasail.evaluation.items import Benchmark, BenchmarkError
from megasail.evaluation.records import (
    NEAR_TIE_THRESHOLD,
    PartialWriter,
    errors_path,
    finalize,
    partial_paths,
    read_records,
    repair_partials,
    score_records,
)
from megasail.evaluation.report import build_scores, format_table, predictions_path, write_scores

log = logging.getLogger("evaluate")
SETTINGS_FILE = "evaluate.json"


class EvaluationError(RuntimeError):
    """An evaluation that cannot run as asked; the message says what to change."""


@dataclass
class EvalConfig:
    benchmarks: list[str]
    output_dir: str
    load: str | None = None  # megasail checkpoint or HuggingFace directory; None with predictions_dir
    predictions_dir: str | None = None  # score these predictions instead of generating
    metrics: dict[str | None, str] = field(default_factory=dict)  # benchmark name (None: all) -> metric
    prompt_suffixes: dict[str | None, str] = field(
        default_factory=dict
    )  # benchmark name (None: all) -> suffix
    batch_size: int = 8
    max_new_tokens: int = 64
    temperature: float | None = None  # None: greedy
    top_p: float = 1.0
    seed: int = 0
    tokenizer: str | None = None
    template: str | None = None
    system: str | None = None
    max_tiles: int | None = None
    precision: str | None = None
    transformer_impl: str = "local"
    decode_backend: str = "pil"
    near_tie_threshold: float = NEAR_TIE_THRESHOLD
    overwrite: bool = False
    bucket: bool = True
    prefetch_batches: int = 2
    progress: bool = True


def load_benchmarks(cfg: EvalConfig, require_images: bool) -> list[Benchmark]:
    """Every --benchmark file read and checked; two files with one stem (one scores.json key) are refused."""
    benchmarks, seen = [], {}
    for path in cfg.benchmarks:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in seen:
            raise BenchmarkError(
                f"{path}: another benchmark is also named {name!r} ({seen[name]}); rename one"
            )
        seen[name] = path
        benchmarks.append(load_benchmark(
            path, metric=cfg.metrics.get(name, cfg.metrics.get(None)),
            prompt_suffix=cfg.prompt_suffixes.get(name, cfg.prompt_suffixes.get(None)), require_images=require_images,
        ))  # fmt: skip
    unknown = [k for k in (*cfg.metrics, *cfg.prompt_suffixes) if k is not None and k not in seen]
    if unknown:
        raise BenchmarkError(f"--metric/--prompt-suffix: {unknown[0]!r} names none of the benchmarks "
                             f"({', '.join(seen)})")  # fmt: skip
    return benchmarks


def _scores(benchmarks, records, threshold) -> dict:
    return build_scores(
        {b.name: score_records(b, *records[b.name], near_tie_threshold=threshold) for b in benchmarks}
    )


def _report(scores: dict, out_dir: str) -> None:
    print(format_table(scores), flush=True)
    print(f"scores: {os.path.join(out_dir, 'scores.json')}", flush=True)


def rescore(cfg: EvalConfig) -> dict:
    """Score the predictions in cfg.predictions_dir (no model, no images read); writes OUT_DIR/scores.json."""
    benchmarks = load_benchmarks(cfg, require_images=False)
    records = {}
    for bench in benchmarks:
        if not os.path.isfile(predictions_path(cfg.predictions_dir, bench.name)) and not partial_paths(
            cfg.predictions_dir, bench.name
        ):
            raise EvaluationError(f"{predictions_path(cfg.predictions_dir, bench.name)}: no predictions for "
                                  f"benchmark {bench.name!r}")  # fmt: skip
        records[bench.name] = read_records(cfg.predictions_dir, bench.name)
    scores = _scores(benchmarks, records, cfg.near_tie_threshold)
    write_scores(cfg.output_dir, scores)
    _report(scores, cfg.output_dir)
    return scores


# -- the run's settings: a rerun continues only what the same settings started -----------------------


def resolved_checkpoint(path: str) -> str:
    """The directory whose weights --load reads: a HuggingFace dir, or the megasail step dir it names."""
    from megasail.inference.loading import is_hf_directory

    if not os.path.isdir(path):
        raise EvaluationError(f"--load {path}: no such directory")
    if is_hf_directory(path):
        return os.path.abspath(path)
    from megasail.checkpoint import MARKER, latest_checkpoint

    try:
        step = latest_checkpoint(path)
    except ValueError as e:
        raise EvaluationError(f"--load {path}: {e}") from None
    if step is None:
        raise EvaluationError(f"--load {path}: neither a megasail checkpoint (no iter_* step dir, no "
                              f"{MARKER}) nor a HuggingFace directory (no config.json)")  # fmt: skip
    return os.path.abspath(step)


def run_settings(cfg: EvalConfig, checkpoint: str, benchmarks: list[Benchmark]) -> dict:
    """What decides the predictions (never the batch size or the parallel layout)."""
    import torch

    generation = {
        "max_new_tokens": cfg.max_new_tokens, "greedy": cfg.temperature is None, "tokenizer": cfg.tokenizer,
        "template": cfg.template, "system": cfg.system, "max_tiles": cfg.max_tiles,
        "precision": cfg.precision or ("bf16" if torch.cuda.is_available() else "fp32"),
        "transformer_impl": cfg.transformer_impl, "decode_backend": cfg.decode_backend,
    }  # fmt: skip
    if cfg.temperature is not None:
        generation.update(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    return {
        "checkpoint": checkpoint,
        "generation": generation,
        "benchmarks": {
            b.name: {
                "path": b.path,
                "metric": b.metric,
                "prompt_suffix": b.prompt_suffix,
                "questions": len(b),
            }
            for b in benchmarks
        },
    }


def _has_records(out_dir: str, name: str) -> bool:
    return bool(partial_paths(out_dir, name)) or any(
        os.path.exists(p) for p in (predictions_path(out_dir, name), errors_path(out_dir, name))
    )


def _settings_conflict(out_dir: str, settings: dict, previous: dict | None, names: list[str]) -> str | None:
    """Why the predictions already in out_dir must not be continued with these settings (None: they may)."""
    started = [n for n in names if _has_records(out_dir, n)]
    if not started:
        return None
    fix = "pass --overwrite to predict them again, or choose another --output-dir"
    if previous is None:
        return f"{out_dir} holds predictions for {started[0]!r} but no {SETTINGS_FILE}; {fix}"
    changed = [
        (k, previous.get(k), settings[k])
        for k in ("checkpoint", "generation")
        if previous.get(k) != settings[k]
    ]
    for name in started:
        old = previous.get("benchmarks", {}).get(name, {})
        changed += [(f"{name}.{k}", old.get(k), v) for k, v in settings["benchmarks"][name].items()
                    if k != "questions" and old.get(k) != v]  # fmt: skip
    if not changed:
        return None
    what = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed)[:600]
    return f"{out_dir} holds predictions made with other settings ({what}); {fix}"


def _prepare_output(cfg: EvalConfig, settings: dict, benchmarks: list[Benchmark]) -> dict[str, tuple]:
    """Global rank 0: check and ready OUT_DIR; returns name -> (predictions, errors) already there."""
    out = cfg.output_dir
    names = [b.name for b in benchmarks]
    if cfg.overwrite:
        for name in names:
            for path in [predictions_path(out, name), errors_path(out, name), *partial_paths(out, name)]:
                if os.path.exists(path):
                    os.remove(path)
    settings_path = os.path.join(out, SETTINGS_FILE)
    previous = None
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            previous = json.load(f)
    conflict = _settings_conflict(out, settings, previous, names)
    if conflict:
        raise EvaluationError(conflict)
    os.makedirs(out, exist_ok=True)
    done = {}
    for name in names:
        if repair_partials(out, name):
            log.info("%s: dropped the cut-off last line of an interrupted batch", name)
        done[name] = read_records(out, name)
    merged = dict(settings, benchmarks={**(previous or {}).get("benchmarks", {}), **settings["benchmarks"]})
    tmp = f"{settings_path}.tmp"
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(tmp, settings_path)
    return done


# -- generation ------------------------------------------------------------------------------------


def _read_images(item) -> list[bytes]:
    """The item's images as encoded bytes: TSV bytes as they are, JSONL paths read now."""
    from megasail.inference.batched import ImageReadError

    images = []
    for image in item.images:
        if isinstance(image, (bytes, bytearray)):
            images.append(bytes(image))
            continue
        try:
            with open(image, "rb") as f:
                images.append(f.read())
        except FileNotFoundError:
            raise ImageReadError("image_missing", f"image {image} not found") from None
    return images


def _record(outcome) -> dict:
    """The line a finished item leaves in its partial file (records.py describes both kinds)."""
    if outcome.result is None:
        return {"id": outcome.item.id, "error": outcome.error_reason, "message": outcome.error_message}
    gaps = outcome.result.logit_gaps
    return {"id": outcome.item.id, "prediction": outcome.text, "min_logit_gap": min(gaps) if gaps else None,
            "new_tokens": len(outcome.result.token_ids), "stopped": outcome.result.stopped}  # fmt: skip


def _predict(
    cfg, bench: Benchmark, todo: list, batched, writer_rank: int, writers: int
) -> tuple[list[dict], float]:
    """This writer's remaining items of one benchmark -> (their records, seconds)."""
    from tqdm import tqdm

    from megasail.inference.batched import WorkItem

    items = (WorkItem(item.id, format_prompt(item, bench.prompt_suffix), lambda item=item: _read_images(item), item)
             for item in todo)  # fmt: skip
    writer = PartialWriter(cfg.output_dir, bench.name, writer_rank)
    bar = tqdm(total=len(todo), desc=bench.name if writers == 1 else f"{bench.name} (writer 0 of {writers})",
               unit="item", dynamic_ncols=True, file=sys.stderr, disable=not cfg.progress or writer_rank != 0)  # fmt: skip
    records, start = [], time.perf_counter()
    try:
        for outcomes in batched.run(items):
            batch = [_record(o) for o in outcomes]
            writer.append(batch)  # on disk before the next batch starts: a rerun skips these ids
            records += batch
            bar.update(len(batch))
            for r in batch:
                if "error" in r:
                    log.warning("%s: question %r has no prediction: %s (%s)", bench.name, r["id"], r["error"],
                                r["message"])  # fmt: skip
    finally:
        bar.close()
        writer.close()
    return records, time.perf_counter() - start


def _generator(cfg: EvalConfig, checkpoint: str):
    """The BatchedGenerator of this rank's part of the model loaded from ``checkpoint``."""
    from megasail.inference import Generator, SamplingParams, pad_token_id, stop_token_ids
    from megasail.inference.batched import BatchedGenerator, BatchingConfig
    from megasail.inference.loading import load_for_generation

    try:
        loaded = load_for_generation(checkpoint, tokenizer=cfg.tokenizer, precision=cfg.precision,
                                     transformer_impl=cfg.transformer_impl)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - any failure to load is reported as one line naming the checkpoint
        raise EvaluationError(
            f"--load {cfg.load}: cannot load the checkpoint ({type(e).__name__}: {e})"
        ) from e
    overrides = {"decode_backend": cfg.decode_backend}
    overrides.update({k: v for k, v in (("template", cfg.template), ("system_message", cfg.system),
                                        ("max_tiles", cfg.max_tiles)) if v is not None})  # fmt: skip
    tokenizer = loaded.tokenizer
    pad = pad_token_id(tokenizer)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, greedy=cfg.temperature is None,
                            temperature=cfg.temperature or 1.0, top_p=cfg.top_p, seed=cfg.seed,
                            stop_token_ids=stop_token_ids(tokenizer))  # fmt: skip
    batching = BatchingConfig(
        batch_size=cfg.batch_size, bucket=cfg.bucket, prefetch_batches=cfg.prefetch_batches
    )
    generator = Generator(loaded.model, pad_token_id=pad)
    return BatchedGenerator(generator, tokenizer, replace(loaded.prompt, **overrides), params, batching)


def _world_group():
    """A gloo group over all ranks whose collectives wait as long as the slowest writer takes."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=30))


def _broadcast(group, value, error: str | None):
    """Rank 0's (value, error) on every rank; every rank raises when rank 0 failed."""
    import torch.distributed as dist

    box = [(value, error)]
    dist.broadcast_object_list(box, src=0, group=group)
    value, error = box[0]
    if error:
        raise EvaluationError(error)
    return value


def run_evaluation(cfg: EvalConfig) -> dict | None:
    """Generate and score on every rank; returns scores.json's content on global rank 0 (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megasail.curation.split import shard_of

    benchmarks = load_benchmarks(cfg, require_images=False)  # a missing image fails its question only
    group = _world_group()
    rank = dist.get_rank()
    # rank 0: before = name -> (predictions, errors) in OUT_DIR before this run
    before, checkpoint, error = None, None, None
    if rank == 0:
        try:
            checkpoint = resolved_checkpoint(cfg.load)
            before = _prepare_output(cfg, run_settings(cfg, checkpoint, benchmarks), benchmarks)
        except (EvaluationError, ValueError, OSError) as e:
            error = str(e)
    done = {n: set(p) for n, (p, _) in before.items()} if before else None
    done, checkpoint = _broadcast(group, (done, checkpoint), error)

    batched = _generator(cfg, checkpoint)  # every rank loads the step dir rank 0 checked
    writer_rank = parallel_state.get_data_parallel_rank()
    writers = parallel_state.get_data_parallel_world_size()
    mine = {}  # name -> (records, seconds), on each writer
    for bench in benchmarks:
        if not batched.is_source:
            for _ in batched.run(None):  # the group's other ranks generate the source's batches
                pass
            continue
        todo = [item for item in bench.items
                if item.id not in done[bench.name] and shard_of(item.id, writers) == writer_rank]  # fmt: skip
        mine[bench.name] = _predict(cfg, bench, todo, batched, writer_rank, writers)

    reports = [None] * dist.get_world_size()
    # waits for every writer: the merged files need all of them
    dist.all_gather_object(reports, mine if batched.is_source else None, group=group)
    if rank != 0:
        return None
    return _merge_and_score(cfg, benchmarks, before, reports, writers)


def _merge_and_score(cfg, benchmarks, records, reports, writers: int) -> dict:
    """Rank 0: add every writer's new records to those from before, write the merged files and
    scores.json, print the table."""
    for bench in benchmarks:
        predictions, errors = records[bench.name]
        earlier = len(predictions)
        seconds, count = 0.0, 0
        for report in reports:
            if report is None:
                continue
            new, spent = report[bench.name]
            seconds, count = max(seconds, spent), count + len(new)
            for r in new:
                (errors if "error" in r else predictions)[str(r["id"])] = r
        errors = {i: e for i, e in errors.items() if i not in predictions}
        records[bench.name] = (predictions, errors)
        finalize(cfg.output_dir, bench, predictions, errors)
        rate = count / seconds if seconds > 0 else 0.0
        print(f"{bench.name}: {count} questions in {seconds:.1f} s ({rate:.2f}/s, {writers} writer(s)), "
              f"{earlier} predicted before this run, {len(errors)} without a prediction", flush=True)  # fmt: skip
    scores = _scores(benchmarks, records, cfg.near_tie_threshold)
    write_scores(cfg.output_dir, scores)
    _report(scores, cfg.output_dir)
    return scores
