"""What an evaluation run keeps per question, on disk while it runs and after, and how it is scored.

    OUT_DIR/NAME.partial-WWWWW.jsonl  appended by data-parallel writer W as its batches finish, one line
                                      per question: a prediction record or an error record (below)
    OUT_DIR/NAME.predictions.jsonl    the merged predictions, in the benchmark's order (written at the end)
    OUT_DIR/NAME.errors.jsonl         questions without a prediction and why (written at the end, if any)

A prediction record: {"id", "prediction", "min_logit_gap", "new_tokens", "stopped"}; min_logit_gap is the
smallest top-1 minus top-2 logit over the generated tokens (the stop token included): below the near-tie
threshold, another batch size or layout may pick the other token. An error record: {"id", "error",
"message"} (error: image_missing, image_corrupt, ...). Predictions files from elsewhere may hold only
{"id", "prediction"}: they score the same, with no near-ties known.

A killed run leaves partial files whose last line may be cut short: ``repair_partials`` drops such a tail
before anything is appended, and ``read_records`` then gives every id predicted so far (an id is
predicted once: a resumed run skips it); errors are tried again.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections import Counter

from megasail.evaluation.items import Benchmark
from megasail.evaluation.metrics import score_benchmark
from megasail.evaluation.report import _write_atomically, predictions_path

NEAR_TIE_THRESHOLD = 1e-5
ERRORS_SUFFIX = ".errors.jsonl"


def partial_path(out_dir: str, name: str, writer: int) -> str:
    return os.path.join(out_dir, f"{name}.partial-{writer:05d}.jsonl")


def partial_paths(out_dir: str, name: str) -> list[str]:
    pattern = re.compile(re.escape(name) + r"\.partial-\d{5}\.jsonl$")
    return sorted(p for p in glob.glob(os.path.join(glob.escape(out_dir), f"{glob.escape(name)}.partial-*.jsonl"))
                  if pattern.search(os.path.basename(p)))  # fmt: skip


def errors_path(out_dir: str, name: str) -> str:
    return os.path.join(out_dir, name + ERRORS_SUFFIX)


def repair_partials(out_dir: str, name: str) -> int:
    """Cut each partial file of benchmark ``name`` after its last complete line; returns the bytes
    dropped (a line cut short by a kill). Run once, before any writer appends."""
    dropped = 0
    for path in partial_paths(out_dir, name):
        with open(path, "rb") as f:
            data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            with open(path, "r+b") as f:
                f.truncate(keep)
            dropped += len(data) - keep
    return dropped


def _read_lines(path: str):
    """(line number, record) of a JSONL file; a line that is not a JSON object raises with file:line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError(f"{path}:{number}: needs an 'id'")
            yield number, record


def _is_prediction(record: dict, where: str) -> bool:
    if isinstance(record.get("prediction"), str):
        return True
    if isinstance(record.get("error"), str):
        return False
    raise ValueError(f"{where}: needs a 'prediction' string (or an 'error')")


def read_records(out_dir: str, name: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """(id -> prediction record, id -> error record) of benchmark ``name`` in ``out_dir``: the merged
    predictions file, the errors file and every partial file. An id predicted anywhere has no error.

    A repeated id inside the merged predictions file is refused (file:line); the partial files of a
    resumed run hold each id at most once as a prediction, and the same prediction as the merged
    file when both do (a kill between writing one and deleting the other)."""
    predictions: dict[str, dict] = {}
    errors: dict[str, dict] = {}
    merged = predictions_path(out_dir, name)
    if os.path.isfile(merged):
        first: dict[str, int] = {}
        for number, record in _read_lines(merged):
            item_id = str(record["id"])
            _is_prediction(record, f"{merged}:{number}")
            if item_id in first:
                raise ValueError(
                    f"{merged}:{number}: duplicate id {item_id!r} (first on line {first[item_id]})"
                )
            first[item_id] = number
            predictions[item_id] = record
    sources = [errors_path(out_dir, name)] if os.path.isfile(errors_path(out_dir, name)) else []
    for path in sources + partial_paths(out_dir, name):
        for number, record in _read_lines(path):
            item_id = str(record["id"])
            if _is_prediction(record, f"{path}:{number}"):
                predictions.setdefault(item_id, record)
            else:
                errors[item_id] = record
    return predictions, {i: e for i, e in errors.items() if i not in predictions}


class PartialWriter:
    """Appends one data-parallel writer's records of one benchmark, a batch per write."""

    def __init__(self, out_dir: str, name: str, writer: int):
        self.path = partial_path(out_dir, name, writer)
        self._file = None

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        if self._file is None:
            self._file = open(self.path, "ab")
        # one write per batch: a kill leaves whole lines and at most one cut-off line at the end
        self._file.write(b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records))
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _lines(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def finalize(
    out_dir: str, benchmark: Benchmark, predictions: dict[str, dict], errors: dict[str, dict]
) -> None:
    """Write NAME.predictions.jsonl (and NAME.errors.jsonl when there are errors) in the benchmark's
    order, each atomically, then delete the partial files they replace."""
    order = [item.id for item in benchmark.items]
    _write_atomically(
        predictions_path(out_dir, benchmark.name), _lines(predictions[i] for i in order if i in predictions)
    )
    error_file = errors_path(out_dir, benchmark.name)
    failed = [errors[i] for i in order if i in errors and i not in predictions]
    if failed:
        _write_atomically(error_file, _lines(failed))
    elif os.path.exists(error_file):
        os.remove(error_file)
    for path in partial_paths(out_dir, benchmark.name):
        os.remove(path)


def score_records(
    benchmark: Benchmark,
    predictions: dict[str, dict],
    errors: dict[str, dict] | None = None,
    near_tie_threshold: float = NEAR_TIE_THRESHOLD,
) -> dict:
    """score_benchmark of the predictions, plus:

    near_ties: predictions whose min_logit_gap is below ``near_tie_threshold`` (a greedy choice another
    batch size or parallel layout may flip); near_tie_ids: their ids in benchmark order;
    near_tie_threshold: the threshold.
    errors: questions that have no prediction because of an error record; error_reasons: reason -> count.
    """
    result = score_benchmark(benchmark, {i: r["prediction"] for i, r in predictions.items()})
    order = [item.id for item in benchmark.items]
    near = [
        i for i in order
        if i in predictions and predictions[i].get("min_logit_gap") is not None
        and predictions[i]["min_logit_gap"] < near_tie_threshold
    ]  # fmt: skip
    reasons = Counter(errors[i]["error"] for i in order if errors and i in errors and i not in predictions)
    result.update(
        near_ties=len(near),
        near_tie_ids=near,
        near_tie_threshold=near_tie_threshold,
        errors=sum(reasons.values()),
        error_reasons=dict(sorted(reasons.items())),
    )
    return result
