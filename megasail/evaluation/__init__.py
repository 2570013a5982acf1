"""Benchmark readers (JSONL, VLMEvalKit TSV), metrics with their published definitions, paired bootstrap,
and the runner behind tools/evaluate.py."""

from megasail.evaluation.benchmarks import default_prompt_suffix, format_prompt, load_benchmark
from megasail.evaluation.bootstrap import paired_bootstrap
from megasail.evaluation.items import METRICS, Benchmark, BenchmarkError, BenchmarkItem
from megasail.evaluation.metrics import (
    anls_similarity,
    average_score,
    extract_choice,
    mme_label,
    normalized_score,
    ocrbench_hit,
    pope_label,
    score_benchmark,
    vqa_accuracy,
)
from megasail.evaluation.records import NEAR_TIE_THRESHOLD, read_records, score_records
from megasail.evaluation.report import (
    build_scores,
    format_table,
    read_predictions,
    read_scores,
    write_predictions,
    write_scores,
)
from megasail.evaluation.runner import EvalConfig, EvaluationError, rescore, run_evaluation

__all__ = [
    "METRICS",
    "NEAR_TIE_THRESHOLD",
    "Benchmark",
    "BenchmarkError",
    "BenchmarkItem",
    "EvalConfig",
    "EvaluationError",
    "anls_similarity",
    "average_score",
    "build_scores",
    "default_prompt_suffix",
    "extract_choice",
    "format_prompt",
    "format_table",
    "load_benchmark",
    "mme_label",
    "normalized_score",
    "ocrbench_hit",
    "paired_bootstrap",
    "pope_label",
    "read_predictions",
    "read_records",
    "read_scores",
    "rescore",
    "run_evaluation",
    "score_benchmark",
    "score_records",
    "vqa_accuracy",
    "write_predictions",
    "write_scores",
]
