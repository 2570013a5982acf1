"""Paired bootstrap of the benchmark average: is model b better than model a beyond question-sampling noise?

Each resample draws, for every benchmark (and inside it every stratum: MME's categories), as many
scoring units as it has, with replacement; a unit is one question, or one whole group (the
rotations of a circular multiple-choice question, the question pair of an MME image). a and b are
scored on the same draw, so what differs between them is the predictions only.
"""

from __future__ import annotations

import numpy as np

from megasail.evaluation.items import Benchmark
from megasail.evaluation.metrics import item_score, normalized_from_sums, scoring_units, unit_table

_GATHER_BUDGET = 4_000_000  # floats gathered at once (resamples x units), bounding memory on big benchmarks


def _resampled_sums(table: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """[resamples, 3]: the column sums of table over each row of draws ([resamples, units] indices)."""
    out = np.empty((len(draws), table.shape[1]))
    step = max(1, _GATHER_BUDGET // max(1, draws.shape[1]))
    for start in range(0, len(draws), step):
        chunk = draws[start : start + step]
        for column in range(table.shape[1]):
            out[start : start + step, column] = table[:, column][chunk].sum(axis=1)
    return out


def _item_scores(benchmark: Benchmark, predictions: dict[str, str]) -> np.ndarray:
    return np.array([item_score(benchmark.metric, it, predictions.get(it.id)) for it in benchmark.items])


def paired_bootstrap(
    benchmarks: list[Benchmark],
    predictions_a: dict[str, dict[str, str]],
    predictions_b: dict[str, dict[str, str]],
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """Bootstrap the difference b - a of the benchmark average (average_score, 0-100).

    predictions_x: benchmark name -> {question id -> prediction}; a question without one is wrong.
    Returns {"a", "b" (the averages on the full sets), "difference" (b - a on the full sets),
    "mean_difference" (its mean over resamples), "interval" ([low, high], the percentile interval
    holding `confidence` of the resampled differences), "n_resamples", "seed", "confidence",
    "benchmarks": {name: {"a", "b", "difference", "interval", "units"}}}.
    """
    if n_resamples < 1:
        raise ValueError(f"paired_bootstrap: n_resamples must be at least 1, got {n_resamples}")
    if not benchmarks:
        raise ValueError("paired_bootstrap: no benchmarks")
    for side, predictions in (("a", predictions_a), ("b", predictions_b)):
        absent = [b.name for b in benchmarks if b.name not in predictions]
        if absent:
            raise ValueError(f"paired_bootstrap: predictions_{side} has none for {', '.join(absent)}")
    rng = np.random.default_rng(seed)
    tail = 100.0 * (1.0 - confidence) / 2.0
    average = {"a": np.zeros(n_resamples), "b": np.zeros(n_resamples)}
    observed = {"a": 0.0, "b": 0.0}
    per_benchmark = {}
    for benchmark in benchmarks:
        strata = scoring_units(benchmark.metric, benchmark.items)
        scores = {
            "a": _item_scores(benchmark, predictions_a[benchmark.name]),
            "b": _item_scores(benchmark, predictions_b[benchmark.name]),
        }
        resampled = {"a": [], "b": []}
        full = {"a": [], "b": []}
        counts = [len(units) for units in strata.values()]
        for units in strata.values():
            draws = rng.integers(0, len(units), size=(n_resamples, len(units)))  # shared by a and b
            for side in ("a", "b"):
                table = unit_table(units, scores[side])
                resampled[side].append(_resampled_sums(table, draws))
                full[side].append(table.sum(axis=0))
        entry = {"units": sum(counts)}
        for side in ("a", "b"):
            curve = normalized_from_sums(benchmark.metric, resampled[side], counts)
            average[side] += curve / len(benchmarks)
            entry[side] = float(normalized_from_sums(benchmark.metric, full[side], counts))
            observed[side] += entry[side] / len(benchmarks)
            resampled[side] = curve
        entry["difference"] = entry["b"] - entry["a"]
        low, high = np.percentile(resampled["b"] - resampled["a"], [tail, 100.0 - tail])
        entry["interval"] = [float(low), float(high)]
        per_benchmark[benchmark.name] = entry
    differences = average["b"] - average["a"]
    low, high = np.percentile(differences, [tail, 100.0 - tail])
    return {
        "a": observed["a"],
        "b": observed["b"],
        "difference": observed["b"] - observed["a"],
        "mean_difference": float(differences.mean()),
        "interval": [float(low), float(high)],
        "n_resamples": n_resamples,
        "seed": seed,
        "confidence": confidence,
        "benchmarks": per_benchmark,
    }
