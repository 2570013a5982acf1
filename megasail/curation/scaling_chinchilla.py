"""The Chinchilla loss fit ``L(N, D) = E + A / N^alpha + B / D^beta`` (Hoffmann et al. 2022, approach 3).

As in the paper: parameters ``theta = (e, a, b, alpha, beta)`` with ``E, A, B = exp(e), exp(a), exp(b)``;
the predicted log loss is ``LSE(a - alpha ln N, b - beta ln D, e)`` (log-sum-exp, so every term stays
positive); the objective is the sum over points of ``Huber_delta(predicted log loss - ln L)`` with
``delta = 1e-3``, minimised by L-BFGS (scipy's L-BFGS-B) from every start of the grid
``alpha, beta in {0, 0.5, 1, 1.5, 2}``, ``e in {-1, -0.5, 0, 0.5, 1}``, ``a, b in {0, 5, ..., 25}``
(4,500 starts), keeping the lowest objective. The objective is divided by ``delta`` (same minimiser) so
the gradient is of order 1 and L-BFGS's tolerances mean what they say.

Bootstrap: each resample of the points is fitted by L-BFGS from the ``BOOTSTRAP_STARTS`` best distinct
minima the full grid found on all the points (refitting 4,500 starts per resample would take hours);
percentile intervals per parameter and for the predicted loss.
"""

from __future__ import annotations

import itertools

import numpy as np

HUBER_DELTA = 1e-3
PARAMS = ("E", "A", "B", "alpha", "beta")
BOOTSTRAP_STARTS = 4


def hoffmann_grid() -> np.ndarray:
    """The paper's 4,500 starts as rows (e, a, b, alpha, beta)."""
    alphas = np.arange(0.0, 2.01, 0.5)
    es = np.arange(-1.0, 1.01, 0.5)
    abs_ = np.arange(0.0, 25.01, 5.0)
    return np.array(
        [(e, a, b, al, be) for e, a, b, al, be in itertools.product(es, abs_, abs_, alphas, alphas)]
    )


def _objective(theta, log_n, log_d, log_loss, delta):
    """Huber(delta) of the log-loss residuals, divided by delta, and its gradient over theta (5,)."""
    e, a, b, alpha, beta = theta
    t_n = a - alpha * log_n
    t_d = b - beta * log_d
    pred = np.logaddexp(np.logaddexp(t_n, t_d), e)  # (P,)
    w_n, w_d = np.exp(t_n - pred), np.exp(t_d - pred)  # d pred / d term; the E term's weight is 1 - both
    r = pred - log_loss
    small = np.minimum(np.abs(r), delta)
    loss = (small * (np.abs(r) - 0.5 * small)).sum() / delta
    dr = np.clip(r, -delta, delta) / delta
    g_n, g_d = dr @ w_n, dr @ w_d
    return loss, np.array([dr.sum() - g_n - g_d, g_n, g_d, -(dr * w_n) @ log_n, -(dr * w_d) @ log_d])


def _lbfgs(start, log_n, log_d, log_loss, delta):
    from scipy.optimize import minimize  # scipy only where the Chinchilla fit runs

    res = minimize(
        _objective,
        start,
        args=(log_n, log_d, log_loss, delta),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-10},
    )
    return res.x, float(res.fun)


def _minimise(starts, log_n, log_d, log_loss, delta):
    """Every start's local minimum: (thetas (S, 5), objective values (S,), inf where non-finite)."""
    thetas, values = [], []
    for start in starts:
        theta, value = _lbfgs(start, log_n, log_d, log_loss, delta)
        thetas.append(theta)
        values.append(value if np.all(np.isfinite(theta)) and np.isfinite(value) else np.inf)
    return np.array(thetas).reshape(-1, 5), np.array(values)


def _grid_chunk(job):
    starts, logs, delta = job
    return _minimise(starts, *logs, delta)


def _bootstrap_chunk(job):
    """Best of the given starts for each resample: (rows (R, 5), NaN where every start failed)."""
    index_rows, starts, logs, delta = job
    out = np.full((len(index_rows), 5), np.nan)
    for r, idx in enumerate(index_rows):
        fits, vals = _minimise(starts, *(v[idx] for v in logs), delta)
        if np.any(np.isfinite(vals)):
            out[r] = fits[np.argmin(vals)]
    return out


def _map(fn, jobs, workers, bar):
    """fn over jobs in order, in ``workers`` processes when > 1, advancing bar by each job's size."""
    results = []
    if workers <= 1:
        for job in jobs:
            results.append(fn(job))
            bar.update(len(job[0]))
        return results
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        for job, result in zip(jobs, pool.map(fn, jobs), strict=True):
            results.append(result)
            bar.update(len(job[0]))
    return results


def _chunks(rows, size):
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _distinct_best(thetas, values, k):
    """The k best minima that differ by more than 1e-3 in some parameter."""
    chosen = []
    for i in np.argsort(values):
        if not np.isfinite(values[i]):
            break
        if all(np.max(np.abs(thetas[i] - thetas[j])) > 1e-3 for j in chosen):
            chosen.append(i)
        if len(chosen) == k:
            break
    return thetas[chosen]


def chinchilla_loss(theta, n, d) -> np.ndarray:
    """L at (N, D) for parameter rows theta (R, 5) as (e, a, b, alpha, beta) -> (R, P)."""
    t = np.atleast_2d(theta)
    log_n, log_d = np.log(np.asarray(n, float))[None, :], np.log(np.asarray(d, float))[None, :]
    return np.exp(t[:, :1]) + np.exp(t[:, 1:2] - t[:, 3:4] * log_n) + np.exp(t[:, 2:3] - t[:, 4:5] * log_d)


def _reported(theta):
    e, a, b, alpha, beta = theta.T
    return np.stack([np.exp(e), np.exp(a), np.exp(b), alpha, beta], axis=-1)


def fit_chinchilla(
    n,
    d,
    loss,
    *,
    predict_at=None,
    resamples=1000,
    seed=0,
    level=0.95,
    grid=None,
    delta=HUBER_DELTA,
    workers=1,
    show_progress=False,
) -> dict:
    """Fit points (N params, D tokens, loss), each shape (P,) -> the ``chinchilla`` entry of fit.json.

    ``{"E", "A", "B", "alpha", "beta", "<name>_ci": [lo, hi], "objective", "huber_delta", "starts",
    "status", "message", "bootstrap": {...}, "prediction": {"x": [N, D], "n", "d", "y", "y_ci"}}``; ``predict_at`` is
    an ``(N, D)`` pair. ``grid`` (S, 5) replaces the paper's starts (tests use fewer); ``workers`` > 1
    runs the L-BFGS starts and resamples in that many processes.
    """
    from tqdm import tqdm

    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    if not (n.shape == d.shape == loss.shape and n.ndim == 1):
        raise ValueError(f"n, d and loss must be 1-D of one length; got {n.shape}, {d.shape}, {loss.shape}")
    for name, v in (("n", n), ("d", d), ("loss", loss)):
        if np.any(~np.isfinite(v)) or np.any(v <= 0):
            raise ValueError(f"every {name} must be finite and > 0 (the fit takes its logarithm)")
    entry: dict = {name: None for name in PARAMS}
    entry.update({f"{name}_ci": None for name in PARAMS})
    entry.update(status="ok", message="", n_points=int(len(n)), huber_delta=delta)
    if len(n) < len(PARAMS) + 1:
        entry.update(
            status="too_few_points",
            message=f"the Chinchilla form has 5 parameters and needs at least 6 points; got {len(n)}",
        )
        return entry
    logs = np.log(n), np.log(d), np.log(loss)
    starts = hoffmann_grid() if grid is None else np.asarray(grid, dtype=float).reshape(-1, 5)
    bar = tqdm(total=len(starts) + resamples, desc="chinchilla L-BFGS", unit="fit", disable=not show_progress)
    parts = _map(_grid_chunk, [(c, logs, delta) for c in _chunks(starts, 100)], workers, bar)
    thetas, values = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if not np.any(np.isfinite(values)):
        bar.close()
        entry.update(status="failed", message="L-BFGS gave non-finite parameters from every start")
        return entry
    best_starts = _distinct_best(thetas, values, BOOTSTRAP_STARTS)
    theta = best_starts[0]
    index_rows = np.random.default_rng(seed).integers(0, len(n), size=(resamples, len(n)))
    jobs = [(c, best_starts, logs, delta) for c in _chunks(index_rows, 25)]
    boot = np.concatenate([np.empty((0, 5))] + _map(_bootstrap_chunk, jobs, workers, bar))
    bar.close()
    failed = ~np.all(np.isfinite(boot), axis=1)
    tail = 50 * (1 - level)
    shown, shown_boot = _reported(theta), _reported(boot[~failed])
    for k, name in enumerate(PARAMS):
        entry[name] = float(shown[k])
        ci = np.percentile(shown_boot[:, k], [tail, 100 - tail]) if len(shown_boot) else [np.nan, np.nan]
        entry[f"{name}_ci"] = [float(v) for v in ci]
    entry.update(objective=float(values.min()) * delta, starts=int(len(starts)))
    entry["bootstrap"] = {"resamples": int(resamples), "failed": int(failed.sum()), "seed": int(seed)}
    if np.any(np.abs(theta[3:]) < 1e-6) or np.any(theta[3:] < 0):
        entry.update(
            status="ill_conditioned",
            message="an exponent reached 0 or below: the points do not "
            "span enough N or D to separate the terms",
        )
    if predict_at is not None:
        pn, pd = (float(v) for v in predict_at)
        pred_boot = chinchilla_loss(boot[~failed], [pn], [pd])[:, 0]
        entry["prediction"] = {
            "x": [pn, pd],
            "n": pn,
            "d": pd,
            "y": float(chinchilla_loss(theta, [pn], [pd])[0, 0]),
            "y_ci": [float(v) for v in np.percentile(pred_boot, [tail, 100 - tail])]
            if len(pred_boot)
            else None,
        }
    entry["_curve"] = {"theta": theta, "boot": boot[~failed]}
    return entry
