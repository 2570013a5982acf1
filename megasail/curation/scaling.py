"""Scaling-curve fits of a score against training tokens (or samples), with bootstrap intervals.

Two forms, both in the natural logarithm:

- ``log_linear``: ``y = a + b ln x`` (SAIL-VL's benchmark scores up to 655B tokens), least squares.
- ``power_law``: ``y = c - a x^(-b)`` with ``b > 0``; saturates at ``c`` (from below when ``a > 0``, a score;
  from above when ``a < 0``, a loss). Given ``b`` the model is linear in ``(c, a)``, so ``(c, a)`` are solved
  exactly and only ``b`` is searched: a log-spaced grid over [``B_MIN``, ``B_MAX``] (global, no start
  needed), a finer grid around the best cell, then a parabola through the three best points in ``ln b``.
  ``x`` is measured in units of ``x_ref`` (the geometric mean of the points' ``x``) while searching, which
  keeps ``x^(-b)`` near 1; the reported ``a`` is in the units of ``x`` (``a = a_ref * x_ref^b``).

Every fitter takes a batch of data sets ``x_rm, y_rm`` of shape (R, m) and returns parameters (R, k), so
the fit to the points (R = 1), the bootstrap (R = resamples, rows drawn with replacement) and
leave-one-out (R = n, each row missing one point) run the same code. A row that cannot be fitted (too
few distinct ``x``) gives NaN and is counted, never dropped silently.

Uncertainty: percentile intervals over ``resamples`` bootstrap resamples of the points (seeded), for each
parameter and for the prediction. Model choice: root mean square error of leave-one-out predictions;
``best`` is the form with the lower one among the forms whose fit is ``ok``.
"""

from __future__ import annotations

import numpy as np

FORMS = ("log_linear", "power_law")
PARAMS = {"log_linear": ("a", "b"), "power_law": ("c", "a", "b")}
B_MIN, B_MAX = 1e-3, 5.0  # power-law exponent search range; an optimum on either end is reported
COARSE_GRID, FINE_GRID = 96, 48
CHUNK_ELEMENTS = 2_000_000  # ~16 MB per work array in the power-law grid search
LOO_MAX_FOLDS = 400  # above this many points, leave-one-out holds out a seeded subset of this size
CONDITION_LIMIT = 1e7  # column-scaled Jacobian condition number above which a fit is ill-conditioned


def _centered_ls(z_rm, y_rm):
    """Least squares of y on [1, z] per row: returns (intercept, slope, residual sum of squares), each (R,)."""
    zc = z_rm - z_rm.mean(axis=1, keepdims=True)
    yc = y_rm - y_rm.mean(axis=1, keepdims=True)
    szz, szy, syy = (zc * zc).sum(1), (zc * yc).sum(1), (yc * yc).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(szz > 1e-300, szy / szz, np.nan)
    intercept = y_rm.mean(1) - slope * z_rm.mean(1)
    return intercept, slope, syy - slope * szy


def _distinct(x_rm) -> np.ndarray:
    """Number of distinct x per row, (R,)."""
    s = np.sort(x_rm, axis=1)
    return 1 + (np.diff(s, axis=1) > 0).sum(axis=1)


def fit_log_linear(x_rm: np.ndarray, y_rm: np.ndarray) -> np.ndarray:
    """``y = a + b ln x`` per row of (R, m) arrays -> (R, 2) columns (a, b); NaN where < 2 distinct x."""
    a, b, _ = _centered_ls(np.log(x_rm), y_rm)
    bad = _distinct(x_rm) < 2
    out = np.stack([a, b], axis=1)
    out[bad] = np.nan
    return out


def _power_rss(u_rm, y_rm, b_rg):
    """Profiled residual sum of squares for each row r and candidate exponent b_rg[r, g]: (R, G)."""
    z = np.exp(-np.clip(b_rg[:, :, None] * u_rm[:, None, :], -700, 700))  # (R, G, m)
    zc = z - z.mean(axis=2, keepdims=True)
    yc = (y_rm - y_rm.mean(axis=1, keepdims=True))[:, None, :]
    szz, szy = (zc * zc).sum(2), (zc * yc).sum(2)
    syy = (yc * yc).sum(2)
    with np.errstate(divide="ignore", invalid="ignore"):
        rss = np.where(szz > 1e-300, syy - szy * szy / szz, np.inf)
    return rss


def fit_power_law(x_rm: np.ndarray, y_rm: np.ndarray, x_ref: float) -> np.ndarray:
    """``y = c - a_ref (x / x_ref)^(-b)`` per row of (R, m) arrays -> (R, 3) columns (c, a_ref, b).

    NaN where a row has fewer than 3 distinct x. ``b`` lies in [B_MIN, B_MAX]; the caller reports an
    optimum on a bound (see ``power_law_diagnosis``). Rows go in chunks so the (rows, grid, m) work
    arrays stay near ``CHUNK_ELEMENTS``.
    """
    step = max(1, CHUNK_ELEMENTS // (COARSE_GRID * max(x_rm.shape[1], 1)))
    parts = [
        _fit_power_law_rows(x_rm[i : i + step], y_rm[i : i + step], x_ref) for i in range(0, len(x_rm), step)
    ]
    return np.concatenate(parts) if parts else np.empty((0, 3))


def _fit_power_law_rows(x_rm, y_rm, x_ref):
    r = x_rm.shape[0]
    u = np.log(x_rm / x_ref)
    lo, hi = np.log(B_MIN), np.log(B_MAX)
    coarse = np.linspace(lo, hi, COARSE_GRID)
    rss = _power_rss(u, y_rm, np.broadcast_to(np.exp(coarse), (r, COARSE_GRID)))
    best = np.argmin(rss, axis=1)
    step = coarse[1] - coarse[0]
    # finer grid over the two cells around the best coarse point, per row
    fine = coarse[best][:, None] + np.linspace(-step, step, FINE_GRID)[None, :]
    fine = np.clip(fine, lo, hi)
    rss_f = _power_rss(u, y_rm, np.exp(fine))
    j = np.clip(np.argmin(rss_f, axis=1), 1, FINE_GRID - 2)
    rows = np.arange(r)
    t0, t1 = fine[rows, j - 1], fine[rows, j]
    f0, f1, f2 = rss_f[rows, j - 1], rss_f[rows, j], rss_f[rows, j + 1]
    # vertex of the parabola through the three points (equal spacing h), kept within one spacing of t1
    h = t1 - t0
    denom = f0 - 2 * f1 + f2
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(denom > 0, 0.5 * h * (f0 - f2) / denom, 0.0)
    log_b = np.clip(t1 + np.clip(shift, -h, h), lo, hi)
    # keep the grid point when the parabola's vertex is no better (flat or noisy profile)
    rss_v = _power_rss(u, y_rm, np.exp(log_b)[:, None])[:, 0]
    log_b = np.where(rss_v <= f1, log_b, t1)
    b = np.exp(log_b)
    z = np.exp(-np.clip(b[:, None] * u, -700, 700))
    c, slope, _ = _centered_ls(z, y_rm)
    out = np.stack([c, -slope, b], axis=1)
    out[_distinct(x_rm) < 3] = np.nan
    return out


def predict(form: str, params_rk: np.ndarray, x: np.ndarray, x_ref: float = 1.0) -> np.ndarray:
    """Curve values at x (shape (P,)) for each parameter row (R, k) -> (R, P).

    ``power_law`` rows are (c, a_ref, b) as ``fit_power_law`` returns them.
    """
    x = np.asarray(x, dtype=float)[None, :]
    p = np.atleast_2d(params_rk)
    if form == "log_linear":
        return p[:, :1] + p[:, 1:2] * np.log(x)
    if form == "power_law":
        return p[:, :1] - p[:, 1:2] * np.exp(-p[:, 2:3] * np.log(x / x_ref))
    raise ValueError(f"unknown form {form!r}; known: {', '.join(FORMS)}")


def _fit(form, x_rm, y_rm, x_ref):
    return fit_log_linear(x_rm, y_rm) if form == "log_linear" else fit_power_law(x_rm, y_rm, x_ref)


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) point indices drawn with replacement from a seeded generator."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def leave_one_out_indices(n: int, held: np.ndarray | None = None) -> np.ndarray:
    """(F, n-1): row f holds every index but held[f] (default: every point held out once, F = n)."""
    held = np.arange(n) if held is None else np.asarray(held)
    cols = np.arange(n - 1)[None, :]
    return cols + (cols >= held[:, None])


def loo_folds(n: int, seed: int = 0) -> np.ndarray:
    """The points held out one at a time: all of them, or a seeded LOO_MAX_FOLDS of them when n is larger."""
    if n <= LOO_MAX_FOLDS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, LOO_MAX_FOLDS, replace=False))


def loo_rmse(form: str, x: np.ndarray, y: np.ndarray, x_ref: float, seed: int = 0) -> float:
    """Root mean square error of predicting each held-out point from a fit to all the others (``loo_folds``);
    NaN when a fold cannot be fitted."""
    held = loo_folds(len(x), seed)
    params = _fit(form, x[leave_one_out_indices(len(x), held)], y[leave_one_out_indices(len(x), held)], x_ref)
    folds = np.arange(len(held))
    held_out = predict(form, params, x[held], x_ref)[folds, folds]
    if not np.all(np.isfinite(held_out)):
        return float("nan")
    return float(np.sqrt(np.mean((held_out - y[held]) ** 2)))


def power_law_diagnosis(x: np.ndarray, y: np.ndarray, params: np.ndarray, x_ref: float) -> tuple[str, str]:
    """(status, message) of a power-law fit (c, a_ref, b): ``ok`` or ``ill_conditioned`` with the reason."""
    c, a_ref, b = params
    if not np.all(np.isfinite(params)):
        return "failed", "the fit gave non-finite parameters"
    if b <= B_MIN * 1.05:
        return "ill_conditioned", (
            f"exponent b at its lower bound {B_MIN:g}: no saturation is visible in the points, the power law "
            "degenerates into the log-linear form (c and a grow without bound); use log_linear"
        )
    if b >= B_MAX * 0.95:
        return "ill_conditioned", (
            f"exponent b at its upper bound {B_MAX:g}: the curve is flat after the first points; add points at small x"
        )
    u = np.log(x / x_ref)
    z = np.exp(-b * u)
    jac = np.stack([np.ones_like(z), -z, a_ref * u * z], axis=1)  # d y / d (c, a_ref, b)
    norms = np.linalg.norm(jac, axis=0)
    if np.any(norms == 0) or np.linalg.cond(jac / norms) > CONDITION_LIMIT:
        return (
            "ill_conditioned",
            "the parameters are not identified by these points (near-flat curve); use log_linear",
        )
    return "ok", ""


def _interval(samples: np.ndarray, level: float) -> list[float]:
    tail = 50 * (1 - level)
    good = samples[np.isfinite(samples)]
    if good.size == 0:
        return [float("nan"), float("nan")]
    return [float(v) for v in np.percentile(good, [tail, 100 - tail])]


def _reported(form: str, params_rk: np.ndarray, x_ref: float) -> np.ndarray:
    """Parameters in the units of x: the power law's a_ref becomes a = a_ref * x_ref^b."""
    if form == "power_law":
        p = params_rk.copy()
        p[:, 1] = p[:, 1] * np.exp(p[:, 2] * np.log(x_ref))
        return p
    return params_rk


def fit_form(form, x, y, *, predict_at=None, resamples=1000, seed=0, level=0.95) -> dict:
    """One form fitted to points x, y (shape (n,)): the ``fit.json`` entry of that form.

    Returns ``{PARAM: value, PARAM_ci: [lo, hi], ..., "loo_rmse", "status", "message", "bootstrap":
    {"resamples", "failed", "seed"}, "prediction": {"x", "y", "y_ci"} (when predict_at)}`` and, under the
    private key ``"_curve"``, what the plot needs (parameters, bootstrap parameters, x_ref).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    names = PARAMS[form]
    n, needed = len(x), len(names) + 1
    entry: dict = {name: None for name in names}
    entry.update({f"{name}_ci": None for name in names})
    entry.update(loo_rmse=None, status="ok", message="", n_points=int(n))
    distinct = int(_distinct(x[None, :])[0]) if n else 0
    if n < needed or distinct < len(names):
        entry["status"] = "too_few_points"
        entry["message"] = (
            f"{form} has {len(names)} parameters and needs at least {needed} points at {len(names)} or more "
            f"distinct x; got {n} points at {distinct} distinct x"
        )
        return entry
    x_ref = float(np.exp(np.mean(np.log(x))))
    params = _fit(form, x[None, :], y[None, :], x_ref)[0]
    if form == "power_law":
        entry["status"], entry["message"] = power_law_diagnosis(x, y, params, x_ref)
    boot = _fit(form, *(v[bootstrap_indices(n, resamples, seed)] for v in (x, y)), x_ref)
    failed = ~np.all(np.isfinite(boot), axis=1)
    shown, shown_boot = _reported(form, params[None, :], x_ref)[0], _reported(form, boot, x_ref)
    for k, name in enumerate(names):
        entry[name] = float(shown[k])
        entry[f"{name}_ci"] = _interval(shown_boot[:, k], level)
    if form == "power_law" and entry["status"] == "ok" and entry["b_ci"][0] <= B_MIN * 1.05:
        entry["message"] = (
            f"b's interval reaches its lower bound {B_MIN:g}: saturation is not established by these points "
            "(c's upper limit means little)"
        )
    entry["loo_rmse"] = loo_rmse(form, x, y, x_ref, seed)
    entry["loo_folds"] = int(len(loo_folds(n, seed)))
    notes = [entry["message"]] if entry["message"] else []
    if not np.isfinite(entry["loo_rmse"]):
        notes.append("leave-one-out could not refit without some point (too few distinct x): not comparable")
    if failed.mean() > 0.05:
        notes.append(
            f"{int(failed.sum())} of {resamples} resamples had too few distinct x: intervals from the rest"
        )
    entry["message"] = "; ".join(notes)
    entry["bootstrap"] = {"resamples": int(resamples), "failed": int(failed.sum()), "seed": int(seed)}
    if predict_at is not None:
        at = np.array([float(predict_at)])
        entry["prediction"] = {
            "x": float(predict_at),
            "y": float(predict(form, params, at, x_ref)[0, 0]),
            "y_ci": _interval(predict(form, boot[~failed], at, x_ref)[:, 0], level),
        }
    entry["_curve"] = {"params": params, "boot": boot[~failed], "x_ref": x_ref}
    return entry


def fit_curves(x, y, *, predict_at=None, resamples=1000, seed=0, level=0.95, forms=FORMS) -> dict:
    """Every form fitted to one series: ``{form: entry, ..., "best": form or None, "prediction": ...}``.

    ``best`` is the ``ok`` form with the lower leave-one-out RMSE (None when no form is ok); the top-level
    ``prediction`` is the best form's (``{"x", "y", "y_ci", "form"}``), absent without ``predict_at`` or best.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D and of one length; got shapes {x.shape} and {y.shape}")
    if np.any(~np.isfinite(x)) or np.any(x <= 0) or np.any(~np.isfinite(y)):
        raise ValueError("every x must be finite and > 0 (the forms take ln x) and every y finite")
    result: dict = {}
    for form in forms:
        result[form] = fit_form(
            form, x, y, predict_at=predict_at, resamples=resamples, seed=seed, level=level
        )
    ok = [f for f in forms if result[f]["status"] == "ok" and np.isfinite(result[f]["loo_rmse"])]
    result["best"] = min(ok, key=lambda f: result[f]["loo_rmse"]) if ok else None
    if result["best"] is not None and predict_at is not None:
        result["prediction"] = dict(result[result["best"]]["prediction"], form=result["best"])
    result["n_points"] = int(len(x))
    result["x_range"] = [float(x.min()), float(x.max())]
    return result


def strip_private(obj):
    """A copy of a fit result without the plot-only ``_curve`` entries and with NaN as None (fit.json is
    strict JSON)."""
    if isinstance(obj, dict):
        return {k: strip_private(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [strip_private(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
