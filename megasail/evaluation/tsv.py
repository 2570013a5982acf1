"""VLMEvalKit's offline benchmark TSVs (the files users keep under ~/LMUData) read as BenchmarkItems.

Columns: `index`, `image` (base64; a cell of at most 64 characters names another row's index whose
image it shares; "['b64', 'b64']" holds several images), `question`, `answer` (a letter, Yes/No, or a
Python list literal of accepted answers), options `A`..`Z`, `category`, and where present `hint`
(put before the question), `image_path` (MME's pairing key), `g_index` (circular group).
MMBench-style circular files keep the rotations of question q at indices q + k * 1e6: they are one
group, the group being `index % 1e6` (VLMEvalKit's mcq_circular_eval).
"""

from __future__ import annotations

import ast
import base64
import binascii
import contextlib
import csv
import hashlib
import os
import re
import string
import sys

from megasail.evaluation.items import BenchmarkError, BenchmarkItem, check_item, check_unique_ids

# file-name patterns (lower-case stem, first match wins) -> metric; None: known, but scored otherwise
NAME_METRICS = (
    (r"^ocrbench[-_]?v2", None),  # OCRBench v2 has its own per-task scoring
    (r"^ocrbench", "ocrbench"),
    (r"^mme[-_]?realworld", None),  # multiple choice over 5 options with its own scoring
    (r"^mme($|[-_])", "mme"),
    (r"^pope", "pope"),
    (r"^(mmbench|ccbench|mmstar|seed[-_]?bench|ai2d|scienceqa|realworldqa)", "mc"),
    (r"circular", "mc"),
    (r"^(textvqa|vqav2|ok[-_]?vqa|vizwiz)", "vqa"),
    (r"^(docvqa|infovqa|infographicsvqa)", "anls"),
)
# VLMEvalKit scores these names with circular evaluation (image_mcq.py: listinstr([...], dataset))
CIRCULAR_NAMES = ("mmbench", "ccbench", "circular", "mmcr")
CIRCULAR_OFFSET = 1_000_000
_IMAGE_REFERENCE_MAX = 64  # VLMEvalKit: an image cell this short is another row's index


def metric_from_name(path: str) -> str:
    """The metric VLMEvalKit uses for a TSV of this name (MME, POPE, OCRBench, MMBench/SEED/AI2D, ...)."""
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    for pattern, metric in NAME_METRICS:
        if re.search(pattern, stem):
            if metric is None:
                break
            return metric
    raise BenchmarkError(
        f"{path}: cannot tell the metric from the file name {stem!r}; pass metric= "
        "(vqa, anls, mc, pope, mme or ocrbench)"
    )


@contextlib.contextmanager
def _large_fields():
    """Base64 images overflow csv's default 128 KiB field limit; raise it for this read only."""
    previous = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_rows(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    with _large_fields(), open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise BenchmarkError(f"{path}:1: empty file, no header row")
        # VLMEvalKit lower-cases every column name but the option letters
        header = [h if h in string.ascii_uppercase else h.strip().lower() for h in header]
        rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise BenchmarkError(
                    f"{path}:{reader.line_num}: {len(row)} fields for {len(header)} columns ({', '.join(header)})"
                )
            rows.append((reader.line_num, row))
    for column in ("index", "question", "answer"):
        if column not in header:
            hint = " (a test split without answers cannot be scored)" if column == "answer" else ""
            raise BenchmarkError(f"{path}:1: no {column!r} column{hint}")
    return header, rows


def _answers(cell: str, metric: str, where: str) -> list[str]:
    cell = cell.strip()
    if metric in ("vqa", "anls", "ocrbench") and cell.startswith("[") and cell.endswith("]"):
        try:
            answers = ast.literal_eval(cell)  # a Python list literal; literal_eval runs no code
        except (ValueError, SyntaxError):
            raise BenchmarkError(f"{where}: 'answer' {cell[:80]!r} is not a list literal") from None
        return [str(a) for a in answers]
    return [cell]


class _ImageCells:
    """Decodes each row's image cell once, following index references; shared images share bytes."""

    def __init__(self, cells: dict[str, tuple[str, str]]):
        """cells: index -> (the image cell, 'file:line')."""
        self.cells: dict[str, tuple[str, str]] = cells
        self.decoded: dict[str, list[bytes]] = {}

    def source(self, index: str) -> tuple[str, str]:
        """(the index of the row holding the data, its cell) for a row."""
        cell, where = self.cells[index]
        if 0 < len(cell) <= _IMAGE_REFERENCE_MAX:
            target = self.cells.get(cell)
            if target is None or len(target[0]) <= _IMAGE_REFERENCE_MAX:
                raise BenchmarkError(f"{where}: image cell {cell!r} names no row holding an image")
            return cell, target[0]
        return index, cell

    def images(self, index: str) -> list[bytes]:
        source, cell = self.source(index)
        if source not in self.decoded:
            where = self.cells[source][1]
            try:
                parts = ast.literal_eval(cell) if cell.startswith("[") and cell.endswith("]") else [cell]
                self.decoded[source] = [base64.b64decode(p, validate=True) for p in parts if p]
            except (binascii.Error, TypeError, ValueError, SyntaxError):
                raise BenchmarkError(f"{where}: 'image' is not valid base64") from None
        return self.decoded[source]


def read_tsv_items(path: str, metric: str | None) -> tuple[str, list[BenchmarkItem]]:
    """The metric (the override, else inferred from the name) and the checked items of a VLMEvalKit TSV."""
    metric = metric or metric_from_name(path)
    header, rows = _read_rows(path)
    records = [(f"{path}:{line}", dict(zip(header, row, strict=True))) for line, row in rows]
    check_unique_ids([(r["index"], where) for where, r in records])
    images = _ImageCells({r["index"]: (r.get("image", ""), where) for where, r in records})
    circular = metric == "mc" and any(n in os.path.basename(path).lower() for n in CIRCULAR_NAMES)
    items = []
    for where, r in records:
        question = r["question"]
        if r.get("hint", "").strip():
            question = r["hint"] + "\n" + question  # as InternVL's and VLMEvalKit's MMBench prompts do
        options = None
        if metric == "mc":
            options = {k: r[k] for k in string.ascii_uppercase if r.get(k, "").strip()}
        group = None
        if circular:
            try:
                group = r.get("g_index") or str(int(float(r["index"])) % CIRCULAR_OFFSET)
            except ValueError:
                raise BenchmarkError(
                    f"{where}: circular file with a non-numeric index {r['index']!r}"
                ) from None
        elif metric == "mme":
            # VLMEvalKit's MME_rating pairs questions by image_path; without it, by the image bytes
            key = r.get("image_path") or hashlib.sha1(images.source(r["index"])[1].encode()).hexdigest()[:16]
            group = f"{r.get('category', '')}/{key}"
        item = BenchmarkItem(
            id=r["index"],
            images=images.images(r["index"]) if r.get("image") else [],
            question=question,
            answers=_answers(r["answer"], metric, where),
            options=options,
            category=r.get("category") or None,
            group=group,
        )
        items.append(check_item(item, metric, where))
    return metric, items
