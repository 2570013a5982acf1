"""fit.png: the points, each fitted form with its bootstrap band, and the prediction with its interval.

One panel per series, x on a log axis. Curve fits: a solid line per ``ok`` form (dashed when the form is
not ok), the pointwise 2.5-97.5% band of the bootstrap curves, the prediction as a point with error bars.
Chinchilla fits: loss against D, one colour per distinct N, the fitted curve of each N with its band.
"""

from __future__ import annotations

import math

import numpy as np

from megasail.curation.scaling import FORMS, predict
from megasail.curation.scaling_chinchilla import chinchilla_loss

COLORS = {"log_linear": "tab:blue", "power_law": "tab:orange"}


def _band(curves_rp: np.ndarray, level: float):
    tail = 50 * (1 - level)
    return np.percentile(curves_rp, [tail, 100 - tail], axis=0)


def _yerr(pred):
    # a percentile interval can miss its estimate by rounding (noiseless points): no negative bars
    return [[max(pred["y"] - pred["y_ci"][0], 0.0)], [max(pred["y_ci"][1] - pred["y"], 0.0)]]


def _curve_panel(ax, name, columns, result, predict_at, level, x_label):
    x, y = np.asarray(columns["x"]), np.asarray(columns["y"])
    hi = max(x.max(), predict_at or 0.0)
    grid = np.geomspace(x.min(), hi, 200)
    ax.scatter(x, y, color="black", s=14, zorder=3, label="points")
    for form in FORMS:
        entry = result.get(form, {})
        curve = entry.get("_curve")
        if curve is None:
            continue
        ok = entry["status"] == "ok"
        label = f"{form} (LOO RMSE {entry['loo_rmse']:.3g})" + ("" if ok else f", {entry['status']}")
        if result.get("best") == form:
            label += ", best"
        ax.plot(
            grid,
            predict(form, curve["params"], grid, curve["x_ref"])[0],
            color=COLORS[form],
            ls="-" if ok else "--",
            label=label,
        )
        if len(curve["boot"]):
            lo, up = _band(predict(form, curve["boot"], grid, curve["x_ref"]), level)
            ax.fill_between(grid, lo, up, color=COLORS[form], alpha=0.15 if ok else 0.07, lw=0)
        pred = entry.get("prediction")
        if pred is not None and all(math.isfinite(v) for v in pred["y_ci"]):
            err = _yerr(pred)
            ax.errorbar([pred["x"]], [pred["y"]], yerr=err, fmt="D", color=COLORS[form], capsize=4, zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("y")
    ax.set_title(name)
    ax.legend(fontsize=7)


def _chinchilla_panel(ax, name, columns, result, level):
    import matplotlib.pyplot as plt

    n, d, loss = (np.asarray(columns[k]) for k in ("n", "d", "loss"))
    entry = result["chinchilla"]
    curve = entry.get("_curve")
    sizes = np.unique(n)
    cmap = plt.get_cmap("viridis")
    for i, size in enumerate(sizes):
        color = cmap(i / max(len(sizes) - 1, 1))
        sel = n == size
        ax.scatter(d[sel], loss[sel], color=color, s=14, zorder=3, label=f"N = {size:.3g}")
        if curve is None:
            continue
        grid = np.geomspace(d[sel].min(), d[sel].max(), 100)
        ax.plot(grid, chinchilla_loss(curve["theta"], np.full_like(grid, size), grid)[0], color=color)
        if len(curve["boot"]):
            lo, up = _band(chinchilla_loss(curve["boot"], np.full_like(grid, size), grid), level)
            ax.fill_between(grid, lo, up, color=color, alpha=0.15, lw=0)
    pred = entry.get("prediction")
    if pred is not None and pred.get("y_ci"):
        err = _yerr(pred)
        ax.errorbar(
            [pred["d"]],
            [pred["y"]],
            yerr=err,
            fmt="D",
            color="tab:red",
            capsize=4,
            label=f"prediction at N = {pred['n']:.3g}",
        )
    ax.set_xscale("log")
    ax.set_xlabel("D (tokens)")
    ax.set_ylabel("loss")
    ax.set_title(f"{name}: L = E + A/N^alpha + B/D^beta")
    ax.legend(fontsize=7)


def write_plot(
    path: str,
    kind: str,
    series: dict,
    results: dict,
    predict_at=None,
    level: float = 0.95,
    x_label: str = "x",
) -> None:
    """Draw every series' panel into ``path`` (PNG). ``series`` maps name -> Series, ``results`` name -> fit
    result with its private ``_curve`` entries. Raises ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    count = len(series)
    cols = min(count, 3)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax, (name, s) in zip(axes.flat, series.items(), strict=False):
        if kind == "chinchilla":
            _chinchilla_panel(ax, name, s.columns, results[name], level)
        else:
            _curve_panel(ax, name, s.columns, results[name], predict_at, level, x_label)
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
