"""What one benchmark question is, the metrics there are, and the checks every reader applies."""

from __future__ import annotations

import dataclasses
import string

METRICS = ("vqa", "anls", "mc", "pope", "mme", "ocrbench")

# MME's calculation.py (eval_type_dict): 10 perception and 4 cognition subtasks, 200 points each
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_CATEGORIES = MME_PERCEPTION + MME_COGNITION

# OCRBench's one category scored without lower-casing and without spaces (VLMEvalKit ocrbench.py)
OCRBENCH_HME = "Handwritten Mathematical Expression Recognition"


class BenchmarkError(ValueError):
    """A benchmark file that cannot be read; the message starts with `file:line:`."""


@dataclasses.dataclass(frozen=True)
class BenchmarkItem:
    """One question.

    images: absolute paths (JSONL) or the encoded bytes (TSV base64, decoded), in prompt order.
    answers: every accepted answer (VQA: the 10 annotators'; mc: the option letter; pope/mme: "yes"/"no").
    options: letter -> text for multiple choice, in letter order; None otherwise.
    category: MME subtask, OCRBench category, or any label to break scores down by.
    group: items scored together: the rotations of one circular multiple-choice question, the two
    questions of one MME image. None: the item stands alone.
    """

    id: str
    images: list
    question: str
    answers: list[str]
    options: dict[str, str] | None = None
    category: str | None = None
    group: str | None = None


@dataclasses.dataclass
class Benchmark:
    """A benchmark file read into memory: name is the file stem (the key in scores.json)."""

    name: str
    path: str
    metric: str
    items: list[BenchmarkItem]
    prompt_suffix: str

    def __len__(self) -> int:
        return len(self.items)


def check_metric(metric, where: str) -> str:
    if metric not in METRICS:
        raise BenchmarkError(f"{where}: unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return metric


def check_item(item: BenchmarkItem, metric: str, where: str) -> BenchmarkItem:
    """Refuse an item the metric cannot score; returns it with yes/no answers lower-cased."""
    if not item.answers or not all(isinstance(a, str) for a in item.answers):
        raise BenchmarkError(f"{where}: 'answers' must be a non-empty list of strings, got {item.answers!r}")
    if item.options is not None:
        bad = [k for k in item.options if len(k) != 1 or k not in string.ascii_uppercase]
        if bad or not item.options:
            raise BenchmarkError(f"{where}: option keys must be single upper-case letters, got {bad or '{}'}")
    if metric == "vqa" and len(item.answers) < 4:
        # leaving each answer out in turn caps a unanimous right prediction at min(1, (N - 1) / 3)
        raise BenchmarkError(
            f"{where}: metric 'vqa' scores against the annotators' answers (10 in VQAv2/TextVQA); with "
            f"{len(item.answers)} a right prediction scores at most {min(1, (len(item.answers) - 1) / 3):.2f}. "
            "Give at least 4 answers, or use metric 'anls'"
        )
    if metric == "mc":
        if not item.options:
            raise BenchmarkError(f"{where}: metric 'mc' needs 'options' (a letter -> text mapping)")
        if item.answers[0] not in item.options:
            raise BenchmarkError(
                f"{where}: the answer {item.answers[0]!r} is not one of the option letters "
                f"{', '.join(item.options)}"
            )
    if metric in ("pope", "mme"):
        label = item.answers[0].strip().lower()
        if label not in ("yes", "no"):
            raise BenchmarkError(f"{where}: metric {metric!r} needs the answer 'yes' or 'no', got {label!r}")
        item = dataclasses.replace(item, answers=[label])
    if metric == "mme":
        if item.category not in MME_CATEGORIES:
            raise BenchmarkError(
                f"{where}: MME category {item.category!r} is not one of {', '.join(MME_CATEGORIES)}"
            )
        if item.group is None:
            raise BenchmarkError(f"{where}: metric 'mme' needs 'group' (the image its question pair shares)")
    return item


def check_unique_ids(ids_with_places: list[tuple[str, str]]) -> None:
    """ids_with_places: (id, 'file:line') in file order; the second use of an id is refused."""
    first: dict[str, str] = {}
    for item_id, where in ids_with_places:
        if item_id in first:
            raise BenchmarkError(f"{where}: duplicate id {item_id!r} (first at {first[item_id]})")
        first[item_id] = where
