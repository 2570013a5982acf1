#!/usr/bin/env python
"""Fit scaling curves (score against training tokens) with bootstrap intervals, and predict at a budget.

python tools/fit_scaling.py --points points.jsonl --predict-at 6.55e11 --output-dir fits/
python tools/fit_scaling.py --runs runs/probe_* --benchmark textvqa --output-dir fits/
python tools/fit_scaling.py --runs runs/probe_a --y-key loss --min-x 1e8 --output-dir fits/
python tools/fit_scaling.py --points losses.jsonl --chinchilla --predict-at 7e10,1.4e12 --output-dir fits/

Points: JSONL {"x": tokens_or_samples, "y": score} (optional "series"), or {"n": params, "d": tokens,
"loss": L} for the Chinchilla form (detected by its keys, or forced with --chinchilla). --runs collects
them from run directories: RUN/eval/iter_NNNNNNN/scores.json (or RUN/eval/step_N/scores.json) give y,
RUN/metrics.jsonl (or RUN/*/metrics.jsonl) gives x = consumed tokens at that step.

Forms: log_linear y = a + b ln x; power_law y = c - a x^(-b); chinchilla L = E + A/N^alpha + B/D^beta
(Huber on log residuals, L-BFGS from Hoffmann et al.'s grid of starts). Intervals: bootstrap percentiles
over the points (--resamples, seeded). best: the ok form with the lower leave-one-out RMSE.

Writes OUTPUT_DIR/fit.json and OUTPUT_DIR/fit.png, prints a table per series. Exit status 1 when some
series has no usable fit (too few points, failed or ill-conditioned; the table says which and why).
See docs/curation.md, "Scaling fits".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from megasail.curation.scaling import PARAMS, fit_curves, strip_private
from megasail.curation.scaling_chinchilla import PARAMS as CHINCHILLA_PARAMS
from megasail.curation.scaling_chinchilla import fit_chinchilla, hoffmann_grid
from megasail.curation.scaling_points import PointsError, read_points, runs_series, thin_log_spaced


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fit_scaling.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--points", metavar="JSONL", help="points file, one JSON object a line")
    src.add_argument(
        "--runs", nargs="+", metavar="DIR", help="run directories or globs (each run is a series)"
    )
    y = p.add_mutually_exclusive_group()
    y.add_argument(
        "--benchmark",
        metavar="NAME",
        help="with --runs: y = benchmarks[NAME].score of each scores.json; 'average' for the average",
    )
    y.add_argument(
        "--y-key",
        metavar="KEY",
        help="with --runs: y = the metrics.jsonl column KEY of every step (e.g. loss, a validation loss)",
    )
    p.add_argument(
        "--x",
        choices=("tokens", "samples"),
        default="tokens",
        help="with --runs: x = consumed_tokens or consumed_samples of the step (default tokens)",
    )
    p.add_argument(
        "--one-series", action="store_true", help="with --runs: pool every run's points into one series"
    )
    p.add_argument(
        "--chinchilla",
        action="store_true",
        help="fit L = E + A/N^alpha + B/D^beta to {n, d, loss} points (detected from the keys anyway)",
    )
    p.add_argument(
        "--predict-at",
        metavar="X",
        help="predict y at X (e.g. 6.55e11 tokens); for --chinchilla N,D (e.g. 7e10,1.4e12)",
    )
    p.add_argument(
        "--min-x", type=float, default=None, help="leave out points with x below this (e.g. warmup)"
    )
    p.add_argument("--max-x", type=float, default=None, help="leave out points with x above this")
    p.add_argument(
        "--max-points",
        type=int,
        default=400,
        help="with --y-key: keep at most this many steps, evenly spaced in ln x (default 400; 0 keeps all)",
    )
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--level", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument(
        "--workers", type=int, default=1, help="processes for the Chinchilla L-BFGS starts (default 1)"
    )
    p.add_argument(
        "--starts-stride",
        type=int,
        default=1,
        metavar="K",
        help="Chinchilla: L-BFGS from every K-th start of Hoffmann et al.'s 4,500 (default 1: all; "
        "a quick look with e.g. 15)",
    )
    p.add_argument("--output-dir", default="fits", help="where fit.json and fit.png go (default fits/)")
    p.add_argument("--no-plot", action="store_true", help="skip fit.png")
    return p


def _predict_at(text: str | None, kind: str):
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise PointsError(
            f"--predict-at {text!r}: expected a number like 6.55e11 (N,D for --chinchilla)"
        ) from None
    want = 2 if kind == "chinchilla" else 1
    if len(values) != want or not all(math.isfinite(v) and v > 0 for v in values):
        shape = (
            "N,D (parameters,tokens), e.g. 7e10,1.4e12" if kind == "chinchilla" else "one x > 0, e.g. 6.55e11"
        )
        raise PointsError(f"--predict-at {text!r}: the {kind} fit predicts at {shape}")
    return tuple(values) if kind == "chinchilla" else values[0]


def _load(args) -> tuple[str, dict]:
    if args.points:
        if args.benchmark or args.y_key or args.one_series:
            raise PointsError("--benchmark, --y-key and --one-series go with --runs, not --points")
        return read_points(args.points, chinchilla=True if args.chinchilla else None)
    if args.chinchilla:
        raise PointsError("--chinchilla needs {n, d, loss} points: use --points")
    if not (args.benchmark or args.y_key):
        raise PointsError(
            "--runs needs --benchmark NAME (scores.json) or --y-key KEY (a metrics.jsonl column)"
        )
    return "curve", runs_series(
        args.runs, benchmark=args.benchmark, y_key=args.y_key, x=args.x, one_series=args.one_series
    )


def _limit_x(series, lo, hi):
    for s in series.values():
        x = s.array("x")
        keep = np.ones(len(x), bool)
        if lo is not None:
            keep &= x >= lo
        if hi is not None:
            keep &= x <= hi
        if not keep.all():
            s.notes.append(f"{int((~keep).sum())} point(s) outside --min-x/--max-x left out")
            s.columns = {
                k: [v for v, k_ in zip(col, keep, strict=True) if k_] for k, col in s.columns.items()
            }


def _g(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def _ci(ci) -> str:
    return "[n/a]" if not ci else f"[{_g(ci[0])}, {_g(ci[1])}]"


def curve_table(name: str, result: dict, level: float) -> str:
    """The markdown table of one series' curve fits."""
    pct = f"{100 * level:g}%"
    lines = [
        f"series {name}: {result['n_points']} points, x {_g(result['x_range'][0])} .. {_g(result['x_range'][1])}"
        f", best: {result['best'] or 'none'}",
        f"| form | parameters [{pct} CI] | LOO RMSE | prediction [{pct} CI] | status |",
        "| --- | --- | --- | --- | --- |",
    ]
    messages = []
    for form, names in PARAMS.items():
        e = result[form]
        params = ", ".join(f"{k} = {_g(e[k])} {_ci(e[f'{k}_ci'])}" for k in names)
        pred = e.get("prediction")
        shown = f"{_g(pred['y'])} {_ci(pred['y_ci'])} at {_g(pred['x'])}" if pred else "-"
        status = e["status"] + (", best" if result["best"] == form else "")
        lines.append(f"| {form} | {params} | {_g(e['loo_rmse'])} | {shown} | {status} |")
        if e["message"]:
            messages.append(f"  {form}: {e['message']}")
    return "\n".join(lines + messages)


def chinchilla_table(name: str, result: dict, level: float) -> str:
    e = result["chinchilla"]
    lines = [
        f"series {name}: {e['n_points']} points, chinchilla fit: {e['status']}",
        f"| parameter | estimate | {100 * level:g}% CI |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {k} | {_g(e[k])} | {_ci(e[f'{k}_ci'])} |" for k in CHINCHILLA_PARAMS]
    pred = e.get("prediction")
    if pred:
        lines.append(f"loss at N = {_g(pred['n'])}, D = {_g(pred['d'])}: {_g(pred['y'])} {_ci(pred['y_ci'])}")
    if e["message"]:
        lines.append(f"  {e['message']}")
    return "\n".join(lines)


def fit_all(kind: str, series: dict, args, predict_at) -> dict:
    """{series name: result} with the private plot entries still in."""
    results = {}
    for name, s in series.items():
        if kind == "chinchilla":
            entry = fit_chinchilla(
                s.array("n"),
                s.array("d"),
                s.array("loss"),
                predict_at=predict_at,
                resamples=args.resamples,
                seed=args.seed,
                level=args.level,
                workers=args.workers,
                show_progress=True,
                grid=hoffmann_grid()[:: args.starts_stride],
            )
            result = {"chinchilla": entry}
            if "prediction" in entry:
                result["prediction"] = entry["prediction"]
        else:
            x, y = s.array("x"), s.array("y")
            if len(x) == 0:
                raise PointsError(
                    f"series {name!r}: no points left to fit ({'; '.join(s.notes) or 'none read'})"
                )
            result = fit_curves(
                x, y, predict_at=predict_at, resamples=args.resamples, seed=args.seed, level=args.level
            )
        if s.notes:
            result["notes"] = list(s.notes)
        results[name] = result
    return results


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (
        min(args.resamples, args.starts_stride, args.workers) < 1
        or args.max_points < 0
        or not 0 < args.level < 1
    ):
        parser.error(
            "--resamples, --starts-stride and --workers must be >= 1, --max-points >= 0, --level in (0, 1)"
        )
    try:
        kind, series = _load(args)
        predict_at = _predict_at(args.predict_at, kind)
        if kind == "curve":
            _limit_x(series, args.min_x, args.max_x)
            if args.y_key and args.max_points:
                for s in series.values():
                    thin_log_spaced(s, args.max_points)
        results = fit_all(kind, series, args, predict_at)
    except (PointsError, OSError) as e:
        print(f"fit_scaling.py: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    clean = {name: strip_private(r) for name, r in results.items()}
    out = next(iter(clean.values())) if len(clean) == 1 else {"series": clean}
    with open(os.path.join(args.output_dir, "fit.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2, allow_nan=False)
        f.write("\n")
    table = chinchilla_table if kind == "chinchilla" else curve_table
    usable = True
    for name, r in results.items():
        print(table(name, r, args.level))
        for note in r.get("notes", []):
            print(f"  note: {note}")
        print()
        usable &= r["chinchilla"]["status"] == "ok" if kind == "chinchilla" else r["best"] is not None
    print(f"wrote {os.path.join(args.output_dir, 'fit.json')}")
    if not args.no_plot:
        png = os.path.join(args.output_dir, "fit.png")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "fit_scaling.py: warning: matplotlib is not installed, fit.png not written "
                "(pip install matplotlib, or megasail[curation])",
                file=sys.stderr,
            )
        else:
            from megasail.curation.scaling_plot import write_plot

            x_label = f"consumed {args.x}" if args.runs else "x"
            write_plot(png, kind, series, results, predict_at, args.level, x_label=x_label)
            print(f"wrote {png}")
    return 0 if usable else 1


if __name__ == "__main__":
    sys.exit(main())
