"""Points for the scaling fits: from a JSONL file, or collected from training runs' directories.

JSONL, one object a line (blank lines skipped), either kind for the whole file:

- curve points ``{"x": tokens_or_samples, "y": score}``, optional ``"series": name`` (default "default");
- loss points ``{"n": parameters, "d": tokens, "loss": L}`` (the Chinchilla fit), optional ``"series"``.

A run directory as ``pretrain_vlm.py`` writes it::

    RUN/metrics.jsonl            logging.dir=RUN (or one RUN/*/metrics.jsonl, e.g. RUN/logs/)
    RUN/eval/iter_0001000/scores.json   an evaluation of checkpoint iter_0001000 (step 1000)
    RUN/eval/step_1000/scores.json      the same, named by step

``scores.json`` is ``{"benchmarks": {NAME: {"metric", "n", "score", ...}}, "average"}``. A point is
``x`` = ``consumed_tokens`` (or ``consumed_samples``) of the metrics row with that step and ``y`` =
``benchmarks[NAME].score`` (or ``average``). A resumed run appends the replayed steps again: the last row
of a step wins (the run that went on). In ``y_key`` mode every metrics row with a finite ``y_key``
column (e.g. ``loss`` or a validation-loss column) is a point instead.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

EVAL_DIR = "eval"
SCORES = "scores.json"
_EVAL_NAME = re.compile(r"^(?:iter_|step_)(\d+)$")
X_KEYS = {"tokens": "consumed_tokens", "samples": "consumed_samples"}


class PointsError(ValueError):
    """Bad input: the message names the file (and line) and what to do."""


@dataclass
class Series:
    """One curve's points: x, y of shape (P,), or for loss points n, d, loss; notes of what was left out."""

    name: str
    columns: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def array(self, key: str) -> np.ndarray:
        return np.asarray(self.columns[key], dtype=float)


def _number(value, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PointsError(f"{where}: {key!r} must be a finite number, got {value!r}")
    return float(value)


def read_points(path: str, chinchilla: bool | None = None) -> tuple[str, dict[str, Series]]:
    """Read a points JSONL -> (kind "curve" or "chinchilla", {series name: Series}) in first-seen order.

    The kind comes from the first point's keys unless ``chinchilla`` forces it; every line must match it.
    """
    series: dict[str, Series] = {}
    kind = None if chinchilla is None else ("chinchilla" if chinchilla else "curve")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PointsError(f"{where}: not JSON ({e.msg}); each line holds one point object") from None
            if not isinstance(row, dict):
                raise PointsError(f'{where}: expected an object like {{"x": 1e9, "y": 41.5}}')
            if kind is None:
                kind = "chinchilla" if {"n", "d", "loss"} <= row.keys() else "curve"
            keys = ("n", "d", "loss") if kind == "chinchilla" else ("x", "y")
            missing = [k for k in keys if k not in row]
            if missing:
                raise PointsError(
                    f"{where}: missing {', '.join(map(repr, missing))}; {kind} points are "
                    + (
                        '{"n": params, "d": tokens, "loss": L}'
                        if kind == "chinchilla"
                        else '{"x": tokens, "y": score}'
                    )
                )
            name = str(row.get("series", "default"))
            s = series.setdefault(name, Series(name, {k: [] for k in keys}))
            for k in keys:
                value = _number(row[k], where, k)
                if k != "y" and value <= 0:
                    raise PointsError(
                        f"{where}: {k!r} must be > 0 (the fits take its logarithm), got {value!r}"
                    )
                s.columns[k].append(value)
    if not series:
        raise PointsError(f"{path}: no points")
    return kind, series


def expand_runs(patterns: list[str]) -> list[str]:
    """Run directories from paths and globs (a glob the shell did not expand is expanded here), sorted per pattern."""
    runs: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise PointsError(f"--runs {pattern!r} matches no directory")
        for path in matches:
            if not os.path.isdir(path):
                raise PointsError(f"--runs {path!r} is not a directory (expected a run's logging.dir)")
            if os.path.normpath(path) not in runs:
                runs.append(os.path.normpath(path))
    return runs


def find_metrics(run: str) -> str:
    """RUN/metrics.jsonl, else the one RUN/*/metrics.jsonl; an error when none or several."""
    direct = os.path.join(run, "metrics.jsonl")
    if os.path.isfile(direct):
        return direct
    nested = sorted(glob.glob(os.path.join(run, "*", "metrics.jsonl")))
    if len(nested) == 1:
        return nested[0]
    if not nested:
        raise PointsError(f"{run}: no metrics.jsonl in it or one level below (the run's logging.dir)")
    raise PointsError(
        f"{run}: several metrics.jsonl ({', '.join(nested)}); pass the directory that holds one"
    )


def read_metrics(path: str) -> tuple[dict[int, dict], list[str]]:
    """{step: row} (the last row of each step) and notes about lines that could not be read."""
    rows: dict[int, dict] = {}
    unreadable = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[int(row["step"])] = row
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                unreadable.append(str(lineno))
    notes = []
    if unreadable:  # a run killed mid-write leaves a partial last line
        notes.append(f"{path}: skipped {len(unreadable)} unreadable line(s): {', '.join(unreadable[:10])}")
    return rows, notes


def _score(path: str, benchmark: str) -> float:
    try:
        with open(path, encoding="utf-8") as f:
            scores = json.load(f)
    except json.JSONDecodeError as e:
        raise PointsError(f"{path}: not JSON ({e.msg})") from None
    benchmarks = scores.get("benchmarks", {}) if isinstance(scores, dict) else {}
    if benchmark == "average":
        if "average" not in scores:
            raise PointsError(
                f"{path}: no 'average' key; benchmarks there: {', '.join(benchmarks) or 'none'}"
            )
        return _number(scores["average"], path, "average")
    if benchmark not in benchmarks:
        raise PointsError(
            f"{path}: no benchmark {benchmark!r}; it has {', '.join(sorted(benchmarks)) or 'none'} "
            "(or use --benchmark average)"
        )
    entry = benchmarks[benchmark]
    if not isinstance(entry, dict) or "score" not in entry:
        raise PointsError(f"{path}: benchmarks.{benchmark} has no 'score'")
    return _number(entry["score"], path, f"benchmarks.{benchmark}.score")


def _x_of(row: dict, x_key: str, where: str) -> float:
    if x_key not in row:
        raise PointsError(f"{where}: the metrics row of step {row.get('step')} has no {x_key!r}")
    return _number(row[x_key], where, x_key)


def run_series(
    run: str, *, benchmark: str | None = None, y_key: str | None = None, x: str = "tokens"
) -> Series:
    """One run's points: evaluations (``benchmark``) or a metrics column (``y_key``), x by ``x`` (tokens/samples)."""
    if (benchmark is None) == (y_key is None):
        raise ValueError("give exactly one of benchmark and y_key")
    x_key = X_KEYS[x]
    metrics_path = find_metrics(run)
    rows, notes = read_metrics(metrics_path)
    series = Series(os.path.basename(run) or run, {"x": [], "y": []}, notes)
    points: list[tuple[float, float]] = []
    if y_key is not None:
        missing = 0
        for step in sorted(rows):
            value = rows[step].get(y_key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                points.append((_x_of(rows[step], x_key, metrics_path), float(value)))
            else:
                missing += 1
        if not points:
            numeric = sorted({k for r in rows.values() for k, v in r.items() if isinstance(v, (int, float))})
            raise PointsError(
                f"{metrics_path}: no row has a finite {y_key!r}; numeric columns: {', '.join(numeric)}"
            )
        if missing:
            series.notes.append(f"{metrics_path}: {missing} row(s) without a finite {y_key!r} left out")
    else:
        eval_root = os.path.join(run, EVAL_DIR)
        names = sorted(os.listdir(eval_root)) if os.path.isdir(eval_root) else []
        evaluated = [(int(m.group(1)), name) for name in names if (m := _EVAL_NAME.match(name))]
        if not evaluated:
            raise PointsError(
                f"{run}: no evaluations: expected {eval_root}/iter_NNNNNNN/{SCORES} or {eval_root}/step_N/{SCORES} "
                "(tools/evaluate.py's --output-dir)"
            )
        ignored = [n for n in names if not _EVAL_NAME.match(n)]
        if ignored:
            series.notes.append(
                f"{eval_root}: ignored {len(ignored)} entr(ies) not named iter_N/step_N: {ignored[:5]}"
            )
        pending = []
        for step, name in sorted(evaluated):
            scores_path = os.path.join(eval_root, name, SCORES)
            if not os.path.isfile(scores_path):
                pending.append(name)
                continue
            y = _score(scores_path, benchmark)
            if step == 0:
                series.notes.append(f"{scores_path}: step 0 (no training) left out: the fits need x > 0")
                continue
            if step not in rows:
                logged = f"steps {min(rows)}..{max(rows)}" if rows else "no steps"
                raise PointsError(
                    f"{scores_path}: step {step} has no row in {metrics_path} ({logged} logged); was the "
                    "checkpoint trained with another logging.dir, or is it from another run?"
                )
            points.append((_x_of(rows[step], x_key, metrics_path), y))
        if pending:
            series.notes.append(
                f"{eval_root}: {len(pending)} evaluation(s) without {SCORES} yet: {pending[:5]}"
            )
    for px, py in points:
        if px <= 0:
            series.notes.append(f"{run}: a point at {x_key} = {px:g} left out: the fits need x > 0")
            continue
        series.columns["x"].append(px)
        series.columns["y"].append(py)
    return series


def thin_log_spaced(series: Series, max_points: int) -> None:
    """Keep at most ``max_points`` points of a curve series, the ones nearest a geometric grid over its x range
    (equal weight per decade; a loss logged every step has most of its points at large x). Noted."""
    x = series.array("x")
    if len(x) <= max_points:
        return
    order = np.argsort(x, kind="stable")
    log_x = np.log(x[order])
    targets = np.linspace(log_x[0], log_x[-1], max_points)
    nearest = np.clip(np.searchsorted(log_x, targets), 1, len(x) - 1)
    nearest -= (targets - log_x[nearest - 1]) < (log_x[nearest] - targets)
    keep = np.sort(order[np.unique(nearest)])
    series.notes.append(
        f"thinned {len(x)} points to {len(keep)}, spaced evenly in ln x (--max-points {max_points})"
    )
    series.columns = {k: [col[i] for i in keep] for k, col in series.columns.items()}


def runs_series(
    patterns: list[str], *, benchmark=None, y_key=None, x="tokens", one_series=False
) -> dict[str, Series]:
    """Every run's Series keyed by its directory name (the relative path when two names clash), or one
    Series named "runs" holding all their points when ``one_series``."""
    runs = expand_runs(patterns)
    found = [run_series(r, benchmark=benchmark, y_key=y_key, x=x) for r in runs]
    basenames = [s.name for s in found]
    for s, run in zip(found, runs, strict=True):
        if basenames.count(s.name) > 1:
            s.name = run
    if one_series:
        merged = Series("runs", {"x": [], "y": []})
        for s in found:
            merged.columns["x"] += s.columns["x"]
            merged.columns["y"] += s.columns["y"]
            merged.notes += s.notes
        return {"runs": merged}
    return {s.name: s for s in found}
