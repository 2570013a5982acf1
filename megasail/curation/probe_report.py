"""The probes' table and summary.json: scores per benchmark, the average, and each probe's gain over the
baseline with a paired bootstrap interval over benchmark items (the same resampled items for both).

Scores are on 0-100 (``normalized_score``: what the benchmark average takes). The gain of probe P is
``average(P) - average(baseline)``; its interval is ``paired_bootstrap(baseline, P)``'s: per benchmark,
scoring units (questions, or whole circular groups) drawn with replacement, both probes scored on the
same draw, the 2.5-97.5 percentiles of the difference of averages. An interval that holds 0 says the
benchmarks cannot tell the probe from the baseline; it covers which questions were asked, not the
training run's own noise (another seed may move a probe by as much).
"""

from __future__ import annotations

import json
import os

from megasail.curation.probe_run import SCORES, finished_eval_dir, is_finished, probe_dir
from megasail.curation.probe_spec import describe_sources

SUMMARY_FILE = "summary.json"


def load_benchmarks(eval_dir: str) -> list:
    """The benchmarks as an evaluation scored them (its evaluate.json: path, metric, prompt suffix)."""
    from megasail.evaluation import load_benchmark

    with open(os.path.join(eval_dir, "evaluate.json"), encoding="utf-8") as f:
        settings = json.load(f)
    return [
        load_benchmark(b["path"], metric=b["metric"], prompt_suffix=b["prompt_suffix"], require_images=False)
        for b in settings["benchmarks"].values()
    ]


def _predictions(eval_dir: str, benchmarks: list) -> dict[str, dict[str, str]]:
    from megasail.evaluation import read_predictions
    from megasail.evaluation.report import predictions_path

    out = {}
    for b in benchmarks:
        path = predictions_path(eval_dir, b.name)
        out[b.name] = read_predictions(path) if os.path.isfile(path) else {}
    return out


class ProbeResults:
    """Finished probes' scores and predictions, read once each; paired intervals between any two."""

    def __init__(self, out: str, n_resamples: int = 1000, seed: int = 0):
        self.out, self.n_resamples, self.seed = out, n_resamples, seed
        self._scores: dict[str, dict] = {}
        self._predictions: dict[str, dict] = {}
        self._benchmarks = None

    def finished(self, name: str) -> bool:
        return is_finished(probe_dir(self.out, name))

    def scores(self, name: str) -> dict:
        if name not in self._scores:
            from megasail.evaluation import read_scores

            self._scores[name] = read_scores(os.path.join(probe_dir(self.out, name), SCORES))
        return self._scores[name]

    def average(self, name: str) -> float:
        return float(self.scores(name)["average"])

    def per_benchmark(self, name: str) -> dict[str, float]:
        from megasail.evaluation import normalized_score

        return {b: normalized_score(r) for b, r in self.scores(name)["benchmarks"].items()}

    def _preds(self, name: str) -> dict:
        eval_dir = finished_eval_dir(probe_dir(self.out, name))
        if self._benchmarks is None:
            self._benchmarks = load_benchmarks(eval_dir)
        if name not in self._predictions:
            self._predictions[name] = _predictions(eval_dir, self._benchmarks)
        return self._predictions[name]

    def compare(self, a: str, b: str) -> dict:
        """paired_bootstrap of b against a: {"difference", "interval", "benchmarks": {name: {...}}}."""
        from megasail.evaluation import paired_bootstrap

        pa, pb = self._preds(a), self._preds(b)
        result = paired_bootstrap(self._benchmarks, pa, pb, n_resamples=self.n_resamples, seed=self.seed)
        return {
            "difference": result["difference"],
            "interval": result["interval"],
            "benchmarks": {
                k: {"difference": v["difference"], "interval": v["interval"]} for k, v in result["benchmarks"].items()
            },
        }


def probe_entry(results: ProbeResults, name: str, record: dict, baseline: str, same_as: str | None) -> dict:
    """One probe's row of summary.json; pending (no scores yet) when it has not finished."""
    source = same_as or name
    entry = {
        "name": name,
        "dir": probe_dir(results.out, source),
        "kind": record["kind"],
        "candidates": record["candidates"],
        "without": record["without"],
        "sources": record["spec"]["sources"],
        "trained_on": describe_sources(record["spec"]["sources"]) if record["spec"]["trains"] else "(--init)",
        "same_as": same_as,
        "finished": results.finished(source),
    }
    if entry["finished"]:
        entry["scores"] = results.per_benchmark(source)
        entry["average"] = results.average(source)
        entry["eval_dir"] = finished_eval_dir(probe_dir(results.out, source))
        if source != baseline and results.finished(baseline):
            entry["gain"] = results.compare(baseline, source)
    return entry


def _signed(x: float) -> str:
    return f"{x:+.2f}"


def _interval(i: list[float]) -> str:
    return f"[{_signed(i[0])}, {_signed(i[1])}]"


def format_probe_table(summary: dict) -> str:
    """A markdown table: probe, trained on, each benchmark (0-100), average, gain vs baseline [95% CI], then
    rank (quality), decision (incremental) or worth (halving)."""
    benchmarks = summary["benchmark_names"]
    mode = summary["mode"]
    extra = {"quality": "rank", "incremental": "decision", "halving": "worth of the left-out half [95% CI]"}[mode]
    rows = [
        "| probe | trained on | " + " | ".join(benchmarks) + f" | average | gain vs baseline [95% CI] | {extra} |",
        "| --- | --- | " + " | ".join("---:" for _ in benchmarks) + " | ---: | --- | --- |",
    ]
    for p in summary["probes"]:
        name = p["name"] + (f" (= {p['same_as']})" if p["same_as"] else "")
        if not p["finished"]:
            rows.append(f"| {name} | {p['trained_on']} | " + " | ".join("" for _ in benchmarks)
                        + " | pending | | |")  # fmt: skip
            continue
        cells = [f"{p['scores'].get(b, float('nan')):.2f}" for b in benchmarks]
        gain = p.get("gain")
        gain_text = f"{_signed(gain['difference'])} {_interval(gain['interval'])}" if gain else ""
        rows.append(
            f"| {name} | {p['trained_on']} | " + " | ".join(cells)
            + f" | {p['average']:.2f} | {gain_text} | {p.get('note', '')} |"
        )  # fmt: skip
    return "\n".join(rows)


def write_summary(out: str, summary: dict) -> str:
    path = os.path.join(out, SUMMARY_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path
