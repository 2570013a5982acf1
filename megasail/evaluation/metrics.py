"""Benchmark metrics, each as its reference implementation defines it (sources in docs/curation.md).

Per question (usable alone): vqa_accuracy, anls_similarity, extract_choice, pope_label, mme_label,
ocrbench_hit. Per benchmark: score_benchmark -> {"metric", "n", "score", "missing", ...extras};
average_score over benchmarks on 0-100. A question without a prediction counts as wrong.

Scores are built from scoring units (one question, or one group: the rotations of a circular
multiple-choice question, the question pair of an MME image) inside strata (MME's categories), so
that the paired bootstrap resamples exactly what the score counts.
"""

from __future__ import annotations

import itertools

import numpy as np

from megasail.evaluation.answer_normalization import normalize_vqa_answer
from megasail.evaluation.items import (
    MME_CATEGORIES,
    MME_COGNITION,
    MME_PERCEPTION,
    OCRBENCH_HME,
    Benchmark,
    BenchmarkItem,
)

ANLS_THRESHOLD = 0.5
# VLMEvalKit's can_infer_option: these characters become spaces before looking for a lone letter
_CHOICE_PUNCTUATION = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy in [0, 1]: each of the N answers left out in turn, min(1, matches among the rest / 3), averaged.

    Answers and prediction are both normalised (normalize_vqa_answer) before comparing.
    """
    guess = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == guess for a in answers]
    total = sum(matches)
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / len(matches)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions); two rows of the dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls_similarity(prediction: str, answers: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one question in [0, 1]: the best over answers of 1 - NL when NL < threshold, else 0.

    NL = Levenshtein distance / the longer string's length, both strings lower-cased with runs of
    whitespace collapsed (the `anls` package's anls_score).
    """
    guess = " ".join(prediction.strip().lower().split())
    best = 0.0
    for answer in answers:
        truth = " ".join(answer.strip().lower().split())
        longer = max(len(guess.upper()), len(truth.upper()))  # the package measures the upper-cased strings
        if longer == 0:
            return 1.0
        if abs(len(guess) - len(truth)) >= threshold * longer:
            continue  # the distance is at least the length gap: NL >= threshold, this answer scores 0
        distance = levenshtein(guess, truth) / longer
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def extract_choice(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a free-text prediction chose, or None (VLMEvalKit's can_infer, exact matching).

    First: exactly one of the option letters stands alone as an upper-case word once the
    characters .()[],:;!*#{} are spaces (it may repeat: "B. B is right" is B). Else: exactly one
    option's text occurs in the prediction, case-insensitively. Else None (scored wrong).
    """
    words = set(prediction.translate(_CHOICE_PUNCTUATION).split())
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    text = prediction.lower()
    found = [letter for letter, option in options.items() if option and option.lower() in text]
    return found[0] if len(found) == 1 else None


def pope_label(prediction: str) -> str:
    """POPE's evaluate.py: the text before the first "." decides; "no" when a word (commas removed)
    is No, no or not, else "yes"."""
    first_sentence = prediction.split(".")[0]
    words = first_sentence.replace(",", "").split()
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def mme_label(prediction: str) -> str:
    """MME's calculation.py: "yes"/"no" when the lower-cased prediction is exactly that, else by what its
    first 4 characters contain ("yes" first), else "other" (scored wrong)."""
    text = prediction.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def ocrbench_hit(prediction: str, answers: list[str], category: str | None) -> bool:
    """VLMEvalKit's ocrbench.py: some answer is a substring of the prediction, both lower-cased and
    stripped; for handwritten mathematical expressions, with spaces removed and case kept."""
    if category == OCRBENCH_HME:
        squeeze = lambda s: s.strip().replace("\n", " ").replace(" ", "")
        return any(squeeze(a) in squeeze(prediction) for a in answers)
    flat = lambda s: s.lower().strip().replace("\n", " ")
    return any(flat(a) in flat(prediction) for a in answers)


def item_score(metric: str, item: BenchmarkItem, prediction: str | None) -> float:
    """One question's score in [0, 1]; a missing prediction scores 0."""
    if prediction is None:
        return 0.0
    if metric == "vqa":
        return vqa_accuracy(prediction, item.answers)
    if metric == "anls":
        return anls_similarity(prediction, item.answers)
    if metric == "mc":
        return float(extract_choice(prediction, item.options) == item.answers[0])
    if metric == "pope":
        return float(pope_label(prediction) == item.answers[0].strip().lower())
    if metric == "mme":
        return float(mme_label(prediction) == item.answers[0].strip().lower())
    if metric == "ocrbench":
        return float(ocrbench_hit(prediction, item.answers, item.category))
    raise ValueError(f"unknown metric {metric!r}")


def scoring_units(metric: str, items: list[BenchmarkItem]) -> dict[str, list[list[int]]]:
    """stratum -> units -> item indices. mc: a unit per group; mme: a stratum per category, a unit per
    group (image); others: one stratum, a unit per question."""
    strata: dict[str, dict[object, list[int]]] = {}
    for index, item in enumerate(items):
        stratum = item.category if metric == "mme" else ""
        key = item.group if metric in ("mc", "mme") and item.group is not None else ("item", index)
        strata.setdefault(stratum, {}).setdefault(key, []).append(index)
    if metric == "mme":
        unknown = sorted(set(strata) - set(MME_CATEGORIES), key=str)
        if unknown:
            raise ValueError(f"MME categories {unknown} are not among {', '.join(MME_CATEGORIES)}")
        strata = {c: strata[c] for c in MME_CATEGORIES if c in strata}
    return {stratum: list(units.values()) for stratum, units in strata.items()}


def unit_table(units: list[list[int]], scores: np.ndarray) -> np.ndarray:
    """[units, 3] float64: the sum of the unit's question scores, its question count, 1 if all are right."""
    members = np.fromiter(itertools.chain.from_iterable(units), dtype=np.int64)
    owner = np.repeat(np.arange(len(units)), [len(u) for u in units])
    member_scores = scores[members]
    total = np.bincount(owner, weights=member_scores, minlength=len(units))
    count = np.bincount(owner, minlength=len(units)).astype(np.float64)
    right = np.bincount(owner, weights=(member_scores == 1.0).astype(np.float64), minlength=len(units))
    return np.stack([total, count, (right == count).astype(np.float64)], axis=1)


def normalized_from_sums(metric: str, sums: list[np.ndarray], unit_counts: list[int]) -> np.ndarray:
    """The benchmark's score on 0-100 from per-stratum column sums of unit_table ([..., 3] each)."""
    if metric == "mc":
        return 100.0 * sum(s[..., 2] for s in sums) / sum(unit_counts)
    if metric == "mme":  # 100 acc + 100 acc+ per category, out of 200 per category
        per_category = [
            50.0 * (s[..., 0] / s[..., 1] + s[..., 2] / n) for s, n in zip(sums, unit_counts, strict=True)
        ]
        return sum(per_category) / len(per_category)
    return 100.0 * sum(s[..., 0] for s in sums) / sum(s[..., 1] for s in sums)


def _unpack(benchmark_or_pair) -> tuple[str, list[BenchmarkItem]]:
    if isinstance(benchmark_or_pair, Benchmark):
        return benchmark_or_pair.metric, benchmark_or_pair.items
    metric, items = benchmark_or_pair
    return metric, list(items)


def score_benchmark(benchmark_or_pair, predictions: dict[str, str]) -> dict:
    """Score predictions (id -> text) on a Benchmark or a (metric, items) pair (ids of other questions
    are ignored, so a subset of a benchmark can be scored with the whole predictions file).

    Returns {"metric", "n" (questions), "score", "missing" (questions without a prediction), ...}:
    vqa/anls: score = 100 x mean. mc: score = 100 x groups all right / groups, "groups",
    "question_accuracy", "no_choice". pope: score = accuracy; "precision", "recall", "f1" (yes is
    positive), "yes_ratio" (share of predictions that say yes), all on 0-100. mme: score =
    perception + cognition (the sums of 100 acc + 100 acc+ of their categories present),
    "per_category" {name: {"acc", "acc_plus", "score"}}, "other" (predictions neither yes nor no).
    ocrbench: score = hits; "accuracy" (0-100), "per_category" hits.
    """
    metric, items = _unpack(benchmark_or_pair)
    if not items:
        raise ValueError("score_benchmark: no questions to score")
    guesses = [predictions.get(item.id) for item in items]
    scores = np.array([item_score(metric, item, g) for item, g in zip(items, guesses, strict=True)])
    tables = {name: unit_table(units, scores) for name, units in scoring_units(metric, items).items()}
    sums = [t.sum(axis=0) for t in tables.values()]
    normalized = float(normalized_from_sums(metric, sums, [len(t) for t in tables.values()]))
    result = {
        "metric": metric,
        "n": len(items),
        "score": normalized,
        "missing": sum(g is None for g in guesses),
    }
    if metric == "mc":
        result["groups"] = len(tables[""])
        result["question_accuracy"] = 100.0 * float(scores.mean())
        result["no_choice"] = sum(
            g is not None and extract_choice(g, item.options) is None
            for item, g in zip(items, guesses, strict=True)
        )
    elif metric == "pope":
        result.update(_pope_extras(items, guesses))
    elif metric == "mme":  # on MME's own scale: points, 200 per category
        result.update(_mme_extras(tables, guesses))
    elif metric == "ocrbench":  # on OCRBench's own scale: hits
        per_category: dict[str, int] = {}
        for item, s in zip(items, scores, strict=True):
            per_category[item.category or ""] = per_category.get(item.category or "", 0) + int(s)
        result.update(score=int(scores.sum()), accuracy=normalized, per_category=per_category)
    return result


def _pope_extras(items: list[BenchmarkItem], guesses: list[str | None]) -> dict:
    """Counts with "yes" positive; a missing prediction says neither yes nor no (a false negative
    when the truth is yes, never a false positive)."""
    said = [None if g is None else pope_label(g) for g in guesses]
    truth = [item.answers[0].strip().lower() for item in items]
    tp = sum(s == "yes" and t == "yes" for s, t in zip(said, truth, strict=True))
    fp = sum(s == "yes" and t == "no" for s, t in zip(said, truth, strict=True))
    fn = sum(s != "yes" and t == "yes" for s, t in zip(said, truth, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / len(items),
    }


def _mme_extras(tables: dict[str, np.ndarray], guesses: list[str | None]) -> dict:
    per_category = {}
    for category, table in tables.items():
        acc = 100.0 * table[:, 0].sum() / table[:, 1].sum()
        acc_plus = 100.0 * table[:, 2].sum() / len(table)
        per_category[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    perception = sum(v["score"] for c, v in per_category.items() if c in MME_PERCEPTION)
    cognition = sum(v["score"] for c, v in per_category.items() if c in MME_COGNITION)
    other = sum(g is not None and mme_label(g) == "other" for g in guesses)
    return {
        "score": perception + cognition,
        "perception": perception,
        "cognition": cognition,
        "per_category": per_category,
        "other": other,
    }


def normalized_score(result: dict) -> float:
    """One benchmark's score on 0-100: mme / (200 per category scored; 2800 for all 14, i.e. mme / 28),
    ocrbench as the share of its questions hit, the others as they are."""
    if result["metric"] == "mme":
        return result["score"] / (2.0 * len(result["per_category"]))
    if result["metric"] == "ocrbench":
        return 100.0 * result["score"] / result["n"]
    return float(result["score"])


def average_score(benchmark_scores: dict[str, dict]) -> float:
    """Mean over benchmarks (name -> score_benchmark result) of normalized_score."""
    if not benchmark_scores:
        raise ValueError("average_score: no benchmarks")
    return sum(normalized_score(r) for r in benchmark_scores.values()) / len(benchmark_scores)
