"""Benchmark files (the project's JSONL, VLMEvalKit's offline TSV) and the prompts asked of the model.

JSONL, one question per line (image paths relative to the file; one metric per file):

    {"id": "q1", "image": "imgs/1.jpg", "question": "What colour is the bus?", "answers": ["red", ...],
     "metric": "vqa", "options": {"A": "red", "B": "blue"}, "category": "color", "group": "img1"}

Nothing here reaches for the network: images are local files or bytes inside the TSV.
"""

from __future__ import annotations

import json
import os

from megasail.evaluation.items import (
    METRICS,
    Benchmark,
    BenchmarkError,
    BenchmarkItem,
    check_item,
    check_metric,
    check_unique_ids,
)

__all__ = [
    "METRICS",
    "Benchmark",
    "BenchmarkError",
    "BenchmarkItem",
    "default_prompt_suffix",
    "format_prompt",
    "load_benchmark",
]

# The instructions InternVL's evaluation appends to each question. Sources:
#   SHORT_ANSWER: internvl_chat/eval/vqa/evaluate_vqa.py (TextVQA, DocVQA, InfoVQA), eval/mme/eval.py,
#     eval/pope/evaluate_pope.py, and VLMEvalKit's vlmeval/vlm/internvl/internvl_chat.py for OCRBench
#   OPTION_LETTER: internvl_chat/eval/mmbench/evaluate_mmbench.py, eval/scienceqa/evaluate_scienceqa.py
#   YES_NO: VLMEvalKit's InternVL prompt for yes/no benchmarks (HallusionBench, AMBER)
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
YES_NO = "Please answer yes or no. " + SHORT_ANSWER
_SUFFIXES = {
    "vqa": SHORT_ANSWER,
    "anls": SHORT_ANSWER,
    "ocrbench": SHORT_ANSWER,
    "mc": OPTION_LETTER,
    "pope": YES_NO,
    # MME's own questions already end in "Please answer yes or no."; InternVL adds SHORT_ANSWER only
    "mme": SHORT_ANSWER,
}


def default_prompt_suffix(metric: str) -> str:
    """The instruction InternVL-family evaluation appends to a question of this metric."""
    return _SUFFIXES[check_metric(metric, "default_prompt_suffix")]


def format_prompt(item: BenchmarkItem, suffix: str) -> str:
    """The text asked of the model: the question, then "A. text" per option (one a line), then the suffix.

    Parts are joined by newlines, as InternVL's multiple-choice evaluation does; image tags are the
    caller's (the chat template places them).
    """
    parts = [item.question]
    if item.options:
        parts += [f"{letter}. {text}" for letter, text in item.options.items()]
    if suffix:
        parts.append(suffix)
    return "\n".join(parts)


def load_benchmark(
    path: str,
    *,
    metric: str | None = None,
    prompt_suffix: str | None = None,
    require_images: bool = True,
) -> Benchmark:
    """Read a benchmark file: `.jsonl` (this project's format) or `.tsv` (VLMEvalKit's offline files).

    metric: overrides the file's (JSONL `metric` field; TSV: inferred from the file name).
    prompt_suffix: the instruction after each question; None takes the file's (JSONL
    `prompt_suffix` field), else default_prompt_suffix(metric).
    require_images: False keeps a JSONL item whose image file is absent (its path as resolved), for
    a runner that reports such items one by one, or for scoring without the images.
    Raises BenchmarkError naming `file:line` for a bad line, a missing image (with the path it was
    resolved to) or a duplicate id.
    """
    if metric is not None:
        check_metric(metric, f"{path}: metric=")
    if not os.path.isfile(path):
        raise BenchmarkError(f"{path}: no such benchmark file")
    extension = os.path.splitext(path)[1].lower()
    file_suffix = None
    if extension == ".jsonl":
        metric, items, file_suffix = read_jsonl_items(path, metric, require_images)
    elif extension == ".tsv":
        from megasail.evaluation.tsv import read_tsv_items

        metric, items = read_tsv_items(path, metric)
    else:
        raise BenchmarkError(f"{path}: unknown benchmark extension {extension!r}; use .jsonl or .tsv")
    if not items:
        raise BenchmarkError(f"{path}: no questions in the file")
    name = os.path.splitext(os.path.basename(path))[0]
    suffix = prompt_suffix if prompt_suffix is not None else file_suffix
    suffix = default_prompt_suffix(metric) if suffix is None else suffix
    return Benchmark(name=name, path=os.path.abspath(path), metric=metric, items=items, prompt_suffix=suffix)


def _text(record: dict, key: str, where: str, required: bool) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            raise BenchmarkError(f"{where}: missing {key!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BenchmarkError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return str(value)


def _image_paths(record: dict, folder: str, where: str, require_images: bool = True) -> list[str]:
    """The record's `image` (a path or a list of paths, relative to the benchmark file) as absolute paths."""
    value = record.get("image")
    if value is None:
        return []
    names = value if isinstance(value, list) else [value]
    paths = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise BenchmarkError(f"{where}: 'image' must be a path or a list of paths, got {value!r}")
        if "://" in name:
            raise BenchmarkError(f"{where}: image {name!r} is a URL; benchmarks read local files only")
        resolved = os.path.normpath(os.path.join(folder, name))
        if require_images and not os.path.isfile(resolved):
            raise BenchmarkError(
                f"{where}: image {name!r} not found (resolved to {resolved}, relative to the "
                f"benchmark file's folder {folder})"
            )
        paths.append(resolved)
    return paths


def _options(record: dict, where: str) -> dict[str, str] | None:
    value = record.get("options")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, (str, int, float)) for v in value.values()):
        raise BenchmarkError(f"{where}: 'options' must map letters to texts, got {value!r}")
    return {str(k): str(value[k]) for k in sorted(value)}


def _record_to_item(record: dict, folder: str, where: str, require_images: bool = True) -> BenchmarkItem:
    answers = record.get("answers")
    if answers is None:
        hint = " (found 'answer': write it as a list, \"answers\": [...])" if "answer" in record else ""
        raise BenchmarkError(f"{where}: missing 'answers'{hint}")
    if not isinstance(answers, list):
        raise BenchmarkError(f"{where}: 'answers' must be a list of strings, got {answers!r}")
    return BenchmarkItem(
        id=_text(record, "id", where, required=True),
        images=_image_paths(record, folder, where, require_images),
        question=_text(record, "question", where, required=True),
        answers=[str(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else a for a in answers],
        options=_options(record, where),
        category=_text(record, "category", where, required=False),
        group=_text(record, "group", where, required=False),
    )


def read_jsonl_items(
    path: str, metric: str | None, require_images: bool = True
) -> tuple[str, list[BenchmarkItem], str | None]:
    """The metric (the override, else the one the lines name), the checked items of a JSONL file, and
    the file's `prompt_suffix` (None when no line has one; one value per file, as for `metric`)."""
    folder = os.path.dirname(os.path.abspath(path))
    records: list[tuple[str, BenchmarkItem]] = []
    file_metric, metric_where = None, None
    file_suffix, suffix_where = None, None
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            where = f"{path}:{line_number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise BenchmarkError(f"{where}: a line must be a JSON object, got {type(record).__name__}")
            line_metric = record.get("metric")
            if line_metric is not None:
                check_metric(line_metric, where)
                if file_metric is None:
                    file_metric, metric_where = line_metric, where
                elif line_metric != file_metric:
                    raise BenchmarkError(
                        f"{where}: metric {line_metric!r} differs from {file_metric!r} at {metric_where}; "
                        "one metric per file"
                    )
            line_suffix = record.get("prompt_suffix")
            if line_suffix is not None:
                if not isinstance(line_suffix, str):
                    raise BenchmarkError(f"{where}: 'prompt_suffix' must be a string, got {line_suffix!r}")
                if file_suffix is None:
                    file_suffix, suffix_where = line_suffix, where
                elif line_suffix != file_suffix:
                    raise BenchmarkError(
                        f"{where}: prompt_suffix {line_suffix!r} differs from {file_suffix!r} at "
                        f"{suffix_where}; one prompt suffix per file"
                    )
            records.append((where, _record_to_item(record, folder, where, require_images)))
    metric = metric or file_metric
    if metric is None:
        raise BenchmarkError(f"{path}:1: no 'metric' in the file; add one or pass metric=")
    check_unique_ids([(item.id, where) for where, item in records])
    return metric, [check_item(item, metric, where) for where, item in records], file_suffix
