"""What an evaluation leaves in OUT_DIR, and the table it prints.

OUT_DIR/NAME.predictions.jsonl   {"id", "prediction"} per line (NAME: the benchmark file's stem)
OUT_DIR/scores.json              {"benchmarks": {NAME: score_benchmark(...)}, "average": float}
"""

from __future__ import annotations

import json
import os

from megasail.evaluation.metrics import average_score, normalized_score

SCORES_FILE = "scores.json"
PREDICTIONS_SUFFIX = ".predictions.jsonl"


def _write_atomically(path: str, text: str) -> None:
    """Write to a temporary file and rename, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def build_scores(benchmark_scores: dict[str, dict]) -> dict:
    """{"benchmarks": name -> score_benchmark result, "average": average_score of them}."""
    return {"benchmarks": dict(benchmark_scores), "average": average_score(benchmark_scores)}


def write_scores(out_dir: str, scores: dict) -> str:
    """Write scores (build_scores' form) to OUT_DIR/scores.json; returns the path."""
    path = os.path.join(out_dir, SCORES_FILE)
    _write_atomically(path, json.dumps(scores, indent=2, sort_keys=False) + "\n")
    return path


def read_scores(path: str) -> dict:
    """Read scores.json (path to the file or to the folder holding it)."""
    if os.path.isdir(path):
        path = os.path.join(path, SCORES_FILE)
    with open(path, encoding="utf-8") as f:
        scores = json.load(f)
    if not isinstance(scores, dict) or "benchmarks" not in scores or "average" not in scores:
        raise ValueError(f"{path}: not a scores file (needs 'benchmarks' and 'average')")
    return scores


def predictions_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, name + PREDICTIONS_SUFFIX)


def write_predictions(out_dir: str, name: str, predictions: dict[str, str]) -> str:
    """Write OUT_DIR/NAME.predictions.jsonl (id -> prediction, one line each); returns the path."""
    lines = [
        json.dumps({"id": i, "prediction": p}, ensure_ascii=False) + "\n" for i, p in predictions.items()
    ]
    path = predictions_path(out_dir, name)
    _write_atomically(path, "".join(lines))
    return path


def read_predictions(path: str) -> dict[str, str]:
    """id -> prediction from a predictions JSONL; a bad line or a repeated id raises with file:line."""
    predictions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            if (
                not isinstance(record, dict)
                or "id" not in record
                or not isinstance(record.get("prediction"), str)
            ):
                raise ValueError(f"{path}:{line_number}: needs {{'id': ..., 'prediction': '...'}}")
            item_id = str(record["id"])
            if item_id in first_line:
                raise ValueError(
                    f"{path}:{line_number}: duplicate id {item_id!r} (first on line {first_line[item_id]})"
                )
            first_line[item_id] = line_number
            predictions[item_id] = record["prediction"]
    return predictions


def _details(result: dict) -> str:
    metric = result["metric"]
    parts = []
    if metric == "mc":
        parts.append(f"groups {result['groups']}, per question {result['question_accuracy']:.2f}")
        if result.get("no_choice"):
            parts.append(f"no choice {result['no_choice']}")
    elif metric == "pope":
        parts.append(
            f"P {result['precision']:.2f}, R {result['recall']:.2f}, F1 {result['f1']:.2f}, "
            f"yes {result['yes_ratio']:.2f}%"
        )
    elif metric == "mme":
        parts.append(f"perception {result['perception']:.2f}, cognition {result['cognition']:.2f}")
        if result.get("other"):
            parts.append(f"neither yes nor no {result['other']}")
    elif metric == "ocrbench":
        parts.append(f"hits of {result['n']} questions")
    if result.get("missing"):
        parts.append(f"missing {result['missing']}")
    if result.get("errors"):  # questions without a prediction because of an error (records.score_records)
        reasons = ", ".join(f"{k} {v}" for k, v in result.get("error_reasons", {}).items())
        parts.append(f"errors {result['errors']} ({reasons})" if reasons else f"errors {result['errors']}")
    if result.get("near_ties"):
        parts.append(f"near-ties {result['near_ties']}")
    return ", ".join(parts)


def format_table(scores: dict) -> str:
    """A markdown table: benchmark, metric, n, score, on 0-100 (what the average takes), details; the
    average last."""
    rows = [
        "| benchmark | metric | n | score | 0-100 | details |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for name, result in scores["benchmarks"].items():
        score = result["score"]
        shown = str(score) if isinstance(score, int) else f"{score:.2f}"
        rows.append(
            f"| {name} | {result['metric']} | {result['n']} | {shown} | "
            f"{normalized_score(result):.2f} | {_details(result)} |"
        )
    rows.append(
        f"| average | | | | {scores['average']:.2f} | mean of {len(scores['benchmarks'])} benchmarks |"
    )
    return "\n".join(rows)
