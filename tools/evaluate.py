#!/usr/bin/env python
"""Score a checkpoint on local benchmark files (this project's JSONL, VLMEvalKit's offline TSV).

    python tools/evaluate.py --benchmark bench/textvqa.jsonl --benchmark bench/pope.jsonl --load CKPT \\
        --output-dir eval/step_1000
    python tools/evaluate.py --benchmark bench/textvqa.jsonl --predictions-dir eval/step_1000 \\
        --output-dir eval/rescored          # scores only, no model
    torchrun --nproc-per-node 8 tools/evaluate.py --load CKPT --tensor-parallel 2 --benchmark ... --output-dir ...

Writes OUT_DIR/NAME.predictions.jsonl ({"id", "prediction", "min_logit_gap", ...}; NAME = the benchmark
file's stem), OUT_DIR/NAME.errors.jsonl for questions that got no prediction (a missing or corrupt
image: counted and listed, the rest of the run goes on), OUT_DIR/scores.json ({"benchmarks": {NAME:
{"metric", "n", "score", "near_ties", "errors", ...}}, "average"}) and OUT_DIR/evaluate.json (the
settings), and prints the table. Generation is greedy, in left-padded batches bucketed by tile count;
predictions are on disk as each batch finishes, and a rerun into the same OUT_DIR skips the questions
already predicted (after a kill too, at any data-parallel size). Ranks beyond --tensor-parallel x
--pipeline-parallel are data-parallel writers, each answering the questions whose id hashes to it.
Predictions do not depend on --batch-size or the number of ranks, except near-ties: answers where the
top two logits of some generated token were within --near-tie-threshold, counted in scores.json.
Exit status: 0 when scored; 2 with one line on stderr for a bad benchmark file, checkpoint or OUT_DIR.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _per_benchmark(values: list[str]) -> dict:
    """'TEXT' (every benchmark) or 'NAME=TEXT' (the benchmark whose file stem is NAME) -> {NAME|None: TEXT}."""
    out = {}
    for value in values:
        name, sep, text = value.partition("=")
        key = name if sep and name and " " not in name else None
        out[key] = text if key is not None else value
    return out


def parse_args(argv=None):
    from megasail.evaluation.records import NEAR_TIE_THRESHOLD

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--benchmark",
        action="append",
        required=True,
        metavar="FILE",
        help="a benchmark file, .jsonl or .tsv (repeatable); its stem names it in scores.json",
    )
    p.add_argument("--output-dir", required=True, help="where predictions, scores.json and evaluate.json go")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--load", help="megasail checkpoint dir (root or iter_*) or a HuggingFace InternVL/SAIL-VL dir"
    )
    src.add_argument("--predictions-dir", help="score the predictions in this directory again (no model)")
    p.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="[NAME=]METRIC",
        help="metric for every benchmark, or for benchmark NAME (overrides the file's; repeatable)",
    )
    p.add_argument(
        "--prompt-suffix",
        action="append",
        default=[],
        metavar="[NAME=]TEXT",
        help="instruction after each question, for every benchmark or for NAME (default: the file's "
        "'prompt_suffix', else the metric's InternVL instruction, e.g. 'Answer the question "
        "using a single word or phrase.'); '' for none",
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="questions generated together per data-parallel writer"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per answer")
    p.add_argument("--temperature", type=float, help="sample with this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature)")
    p.add_argument(
        "--near-tie-threshold",
        type=float,
        default=NEAR_TIE_THRESHOLD,
        help="an answer is a near-tie when some generated token's top two logits differ by less",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="predict these benchmarks again, discarding their predictions in --output-dir",
    )
    p.add_argument(
        "--tensor-parallel", type=int, default=1, help="tensor-parallel size (launch with torchrun)"
    )
    p.add_argument(
        "--pipeline-parallel", type=int, default=1, help="pipeline-parallel size (launch with torchrun)"
    )
    p.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the checkpoint's)")
    p.add_argument("--template", help="chat template name (default: the checkpoint's data template)")
    p.add_argument("--system", help="system message (default: the template's)")
    p.add_argument(
        "--max-tiles", type=int, help="most tiles per image (default: the checkpoint's data setting)"
    )
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument(
        "--transformer-impl",
        default="local",
        choices=("local", "te"),
        help="layers to build; padded batches need local attention",
    )
    p.add_argument(
        "--decode-backend",
        default="pil",
        choices=("pil", "dali", "auto"),
        help="image decoding (pil: the reference pixels, the same on every machine)",
    )
    p.add_argument("--no-bucket", action="store_true", help="batch in file order instead of by tile count")
    p.add_argument(
        "--prefetch-batches", type=int, default=2, help="batches read and decoded ahead in a thread"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.max_tiles is not None and args.max_tiles < 1):
        p.error("--batch-size, --max-new-tokens and --max-tiles must be >= 1")
    args.metrics = _per_benchmark(args.metric)
    args.prompt_suffixes = _per_benchmark(args.prompt_suffix)
    return args


def config_from_args(args):
    from megasail.evaluation.runner import EvalConfig

    return EvalConfig(
        benchmarks=args.benchmark, output_dir=args.output_dir, load=args.load, predictions_dir=args.predictions_dir,
        metrics=args.metrics, prompt_suffixes=args.prompt_suffixes, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        tokenizer=args.tokenizer, template=args.template, system=args.system, max_tiles=args.max_tiles,
        precision=args.precision, transformer_impl=args.transformer_impl, decode_backend=args.decode_backend,
        near_tie_threshold=args.near_tie_threshold, overwrite=args.overwrite, bucket=not args.no_bucket,
        prefetch_batches=args.prefetch_batches, progress=not args.no_progress,
    )  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from megasail.evaluation import BenchmarkError
    from megasail.evaluation.runner import EvaluationError, rescore, run_evaluation

    cfg = config_from_args(args)
    if args.predictions_dir:
        try:
            rescore(cfg)
            return 0
        except (BenchmarkError, EvaluationError, ValueError, OSError) as e:
            print(f"evaluate: error: {e}", file=sys.stderr)
            return 2
    import torch.distributed as dist

    from megasail import runtime

    runtime.initialize(args.tensor_parallel, args.pipeline_parallel, seed=args.seed)
    try:
        run_evaluation(cfg)
        return 0
    except (BenchmarkError, EvaluationError) as e:
        if dist.get_rank() == 0:
            print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    finally:
        runtime.destroy()


if __name__ == "__main__":
    sys.exit(main())
