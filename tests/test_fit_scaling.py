"""Scaling fits (megasail/curation/scaling*.py, tools/fit_scaling.py): recovery of known parameters,
bootstrap coverage, leave-one-out, the Chinchilla fit, and the CLI on JSONL points and run directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megasail.curation.scaling import fit_curves, fit_form, loo_rmse
from megasail.curation.scaling_chinchilla import fit_chinchilla, hoffmann_grid

TOOL = "tools/fit_scaling.py"
X = np.geomspace(1e9, 3e11, 30)  # 1B .. 300B tokens
LOG_LINEAR = {"a": 20.0, "b": 2.5}
POWER_LAW = {"c": 80.0, "a": 3000.0, "b": 0.3}
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022


def _log_linear(x, p=LOG_LINEAR):
    return p["a"] + p["b"] * np.log(x)


def _power_law(x, p=POWER_LAW):
    return p["c"] - p["a"] * x ** (-p["b"])


def _chinchilla_points():
    n = np.repeat(np.geomspace(7e7, 1.6e10, 8), 6)
    d = np.tile(np.geomspace(5e9, 5e11, 6), 8)
    p = CHINCHILLA
    return n, d, p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def _tool(args, repo_root, env=None, check=True):
    full = dict(os.environ, PYTHONPATH=repo_root, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(
        [sys.executable, TOOL, *args], cwd=repo_root, env=full, capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_log_linear_recovers_known_parameters():
    """y = 20 + 2.5 ln x with noise sd 0.5 over 30 points: a, b within 3 standard errors and inside their
    intervals, the prediction at 655B near the truth. Fault caught: log10 instead of ln in the fit (b
    comes out 2.5 * ln 10)."""
    rng = np.random.default_rng(3)
    y = _log_linear(X) + rng.normal(0, 0.5, X.size)
    e = fit_form("log_linear", X, y, predict_at=6.55e11, resamples=300, seed=1)
    assert e["status"] == "ok"
    assert abs(e["b"] - 2.5) < 0.15 and abs(e["a"] - 20.0) < 3.5
    for k, true in LOG_LINEAR.items():
        assert e[f"{k}_ci"][0] <= true <= e[f"{k}_ci"][1], (k, e)
    assert abs(e["prediction"]["y"] - _log_linear(6.55e11)) < 0.6


def test_power_law_recovers_known_parameters_and_wins_on_saturating_points():
    """y = 80 - 3000 x^-0.3 with noise sd 0.3: c and b recovered, a (in the units of x) inside its interval,
    and leave-one-out picks the power law over the log-linear form. Faults caught: the model written
    c + a x^-b (sign flipped: the fit finds a < 0 or misses c), ``best`` taking the larger LOO RMSE."""
    rng = np.random.default_rng(4)
    y = _power_law(X) + rng.normal(0, 0.3, X.size)
    r = fit_curves(X, y, predict_at=6.55e11, resamples=300, seed=2)
    e = r["power_law"]
    assert e["status"] == "ok", e
    assert abs(e["c"] - 80.0) < 1.5 and abs(e["b"] - 0.3) < 0.08 and e["a"] > 0
    for k, true in POWER_LAW.items():
        assert e[f"{k}_ci"][0] <= true <= e[f"{k}_ci"][1], (k, e)
    assert r["best"] == "power_law" and r["power_law"]["loo_rmse"] < r["log_linear"]["loo_rmse"]
    assert r["prediction"]["form"] == "power_law"
    assert abs(r["prediction"]["y"] - _power_law(6.55e11)) < 0.5


def test_power_law_fits_decreasing_loss_curves():
    """A loss falling towards 1.8 (y = 1.8 + 40 x^-0.2): the same form with a < 0 recovers the floor.
    Fault caught: a search restricted to rising curves (a >= 0)."""
    rng = np.random.default_rng(5)
    y = 1.8 + 40 * X**-0.2 + rng.normal(0, 0.005, X.size)
    e = fit_form("power_law", X, y, resamples=100)
    assert e["status"] == "ok" and e["a"] < 0
    assert abs(e["c"] - 1.8) < 0.05 and abs(e["b"] - 0.2) < 0.03


def _coverage(form, truth, mean, reps, resamples, n=30, sd=0.5):
    x = np.geomspace(1e9, 3e11, n)
    hits = {k: 0 for k in truth}
    for rep in range(reps):
        y = mean(x) + np.random.default_rng(10_000 + rep).normal(0, sd, n)
        e = fit_form(form, x, y, resamples=resamples, seed=rep)
        for k, true in truth.items():
            hits[k] += e[f"{k}_ci"][0] <= true <= e[f"{k}_ci"][1]
    return {k: v / reps for k, v in hits.items()}


@pytest.mark.parametrize(
    "form, truth, mean", [("log_linear", LOG_LINEAR, _log_linear), ("power_law", POWER_LAW, _power_law)]
)
def test_bootstrap_intervals_cover_true_values(form, truth, mean):
    """100 seeded repetitions of generate (30 points, noise sd 0.5) -> fit -> 95% interval (200 resamples
    here; the tool's default is 1000): each parameter's interval holds the truth in 88-99.5% of them
    (binomial sd at 95% over 100 draws is 2.2 points). Fault caught: a bootstrap that does not resample
    (every "resample" the original points: zero-width intervals, coverage near 0)."""
    coverage = _coverage(form, truth, mean, reps=100, resamples=200)
    assert all(0.88 <= share <= 0.995 for share in coverage.values()), (form, coverage)


def test_leave_one_out_matches_an_independent_refit():
    """LOO RMSE of the log-linear form equals refitting np.polyfit on ln x without each point in turn.
    Fault caught: the leave-one-out folds leaving nothing out (the in-sample RMSE, smaller)."""
    rng = np.random.default_rng(6)
    x = np.geomspace(1e8, 1e11, 9)
    y = _log_linear(x) + rng.normal(0, 1.0, x.size)
    errors = []
    for i in range(x.size):
        keep = np.arange(x.size) != i
        slope, intercept = np.polyfit(np.log(x[keep]), y[keep], 1)
        errors.append(intercept + slope * np.log(x[i]) - y[i])
    expected = float(np.sqrt(np.mean(np.square(errors))))
    x_ref = float(np.exp(np.log(x).mean()))
    assert loo_rmse("log_linear", x, y, x_ref) == pytest.approx(expected, rel=1e-9)


def test_power_law_on_straight_points_is_flagged_and_few_points_refused():
    """Points exactly linear in ln x give no saturation: the power law is reported ill_conditioned and the
    log-linear form is best; 3 points are too few for the power law (3 parameters + 1), 2 for both.
    Faults caught: the bound check on b removed (an 'ok' power law with c near 1e3), the point count
    check removed (an exact 3-point fit reported as ok)."""
    r = fit_curves(X, _log_linear(X), resamples=50)
    assert r["power_law"]["status"] == "ill_conditioned" and "lower bound" in r["power_law"]["message"]
    assert r["best"] == "log_linear"
    three = fit_curves(X[:3], _power_law(X[:3]), resamples=20)
    assert (
        three["power_law"]["status"] == "too_few_points"
        and "at least 4 points" in three["power_law"]["message"]
    )
    assert three["log_linear"]["status"] == "ok"
    two = fit_curves(X[:2], _power_law(X[:2]), resamples=20)
    assert two["best"] is None and two["log_linear"]["status"] == "too_few_points"


# every 30th of Hoffmann et al.'s 4,500 starts (150): the full grid takes minutes on two shared cores
STARTS = hoffmann_grid()[::30]


def test_chinchilla_recovers_published_parameters():
    """Points generated with E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28 (8 model sizes x 6 token
    counts): the fit recovers all five to 0.1%. Fault caught: the D term fitted with alpha (the two
    exponents swapped in the objective)."""
    n, d, loss = _chinchilla_points()
    e = fit_chinchilla(n, d, loss, resamples=0, grid=STARTS)
    assert e["status"] == "ok"
    for k, true in CHINCHILLA.items():
        assert e[k] == pytest.approx(true, rel=1e-3), (k, e)


def test_chinchilla_with_noise_and_an_outlier():
    """Log-normal noise sd 0.3% plus one point 30% too high: the Huber loss (delta 1e-3 on log residuals)
    keeps E within 2%, the exponents within 0.03, A and B within a factor 1.5, and the predicted loss at
    (70B params, 1.4T tokens) within 0.5% of the truth; every interval holds its estimate and has width.
    Fault caught: plain least squares (delta made huge): the outlier pulls the fit off."""
    n, d, loss = _chinchilla_points()
    rng = np.random.default_rng(7)
    noisy = loss * np.exp(rng.normal(0, 0.003, loss.size))
    noisy[5] *= 1.3
    e = fit_chinchilla(n, d, noisy, resamples=20, seed=3, grid=STARTS, predict_at=(7e10, 1.4e12))
    assert e["status"] == "ok" and e["bootstrap"]["failed"] == 0
    assert e["E"] == pytest.approx(1.69, rel=0.02)
    assert abs(e["alpha"] - 0.34) < 0.03 and abs(e["beta"] - 0.28) < 0.03
    assert 1 / 1.5 < e["A"] / 406.4 < 1.5 and 1 / 1.5 < e["B"] / 410.7 < 1.5
    for k in CHINCHILLA:
        assert e[f"{k}_ci"][0] <= e[k] <= e[f"{k}_ci"][1] and e[f"{k}_ci"][0] < e[f"{k}_ci"][1], (k, e)
    true_loss = 1.69 + 406.4 / 7e10**0.34 + 410.7 / 1.4e12**0.28
    pred = e["prediction"]
    assert pred["y"] == pytest.approx(true_loss, rel=0.005)
    assert pred["y_ci"][0] <= pred["y"] <= pred["y_ci"][1]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cli_on_points_writes_the_documented_fit_json_and_plot(repo_root, tmp_path):
    """The contract's first command on a JSONL of noisy power-law points: fit.json has exactly the
    documented single-series shape, the prediction is at --predict-at, the table is printed and fit.png is
    a non-empty PNG. Fault caught: the plot left unwritten (no fit.png)."""
    rng = np.random.default_rng(8)
    y = _power_law(X) + rng.normal(0, 0.3, X.size)
    points = _write_jsonl(tmp_path / "points.jsonl", [{"x": a, "y": b} for a, b in zip(X, y, strict=True)])
    out = tmp_path / "fits"
    proc = _tool(["--points", points, "--predict-at", "6.55e11", "--output-dir", str(out)], repo_root)
    fit = json.loads((out / "fit.json").read_text())
    assert {"log_linear", "power_law", "best", "prediction"} <= fit.keys()
    assert {"a", "b", "a_ci", "b_ci", "loo_rmse"} <= fit["log_linear"].keys()
    assert {"c", "a", "b", "c_ci", "a_ci", "b_ci", "loo_rmse"} <= fit["power_law"].keys()
    assert fit["best"] == "power_law" and fit["prediction"]["x"] == 6.55e11
    assert {"x", "y", "y_ci"} <= fit["prediction"].keys() and len(fit["prediction"]["y_ci"]) == 2
    assert fit["power_law"]["bootstrap"] == {"resamples": 1000, "failed": 0, "seed": 0}
    assert "| power_law | c = " in proc.stdout and "ok, best" in proc.stdout
    png = (out / "fit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_series_from_points_and_without_matplotlib(repo_root, tmp_path):
    """Two "series" in one JSONL give {"series": {name: {...}}}, each fitted on its own points; with
    matplotlib unimportable the tool warns in one line and still writes fit.json. Faults caught: series
    pooled into one fit, a missing matplotlib crashing the tool."""
    rows = [{"x": x, "y": _log_linear(x) + 0.1 * np.sin(i), "series": "probe_a"} for i, x in enumerate(X[:8])]
    rows += [
        {"x": x, "y": 50 + 1.0 * np.log(x) + 0.1 * np.cos(i), "series": "probe_b"}
        for i, x in enumerate(X[:8])
    ]
    points = _write_jsonl(tmp_path / "points.jsonl", rows)
    out = tmp_path / "fits"
    block = "import sys; sys.modules['matplotlib'] = None; import runpy; sys.argv = sys.argv[1:]; "
    full = dict(os.environ, PYTHONPATH=repo_root, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", block + "runpy.run_path(sys.argv[0], run_name='__main__')", TOOL, "--points",
         points, "--resamples", "100", "--output-dir", str(out)],
        cwd=repo_root, env=full, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    fit = json.loads((out / "fit.json").read_text())
    assert set(fit) == {"series"} and set(fit["series"]) == {"probe_a", "probe_b"}
    assert fit["series"]["probe_a"]["log_linear"]["b"] == pytest.approx(2.5, abs=0.1)
    assert fit["series"]["probe_b"]["log_linear"]["b"] == pytest.approx(1.0, abs=0.1)
    warnings = [line for line in proc.stderr.splitlines() if "matplotlib" in line]
    assert len(warnings) == 1 and "fit.png not written" in warnings[0]
    assert not (out / "fit.png").exists()


def _fake_run(root, name, steps, tokens_per_step, scores, replay_from=None):
    """A run dir as pretrain_vlm.py + tools/evaluate.py leave it: metrics.jsonl (a resumed run's replayed
    steps appended again, with other token counts that must win) and eval/<iter_N|step_N>/scores.json."""
    run = root / name
    (run / "logs").mkdir(parents=True)
    rows = [{"step": s, "loss": 3.0 / s, "consumed_tokens": s * tokens_per_step, "consumed_samples": s * 10}
            for s in range(1, steps + 1)]  # fmt: skip
    if replay_from is not None:  # resumed: the steps after the checkpoint run again
        rows += [dict(r, consumed_tokens=r["consumed_tokens"] + 7) for r in rows[replay_from - 1 :]]
    (run / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i, (step, score) in enumerate(scores.items()):
        folder = run / "eval" / (f"iter_{step:07d}" if i % 2 else f"step_{step}")
        folder.mkdir(parents=True)
        doc = {
            "benchmarks": {"textvqa": {"metric": "vqa_accuracy", "n": 100, "score": score}},
            "average": score - 1,
        }
        (folder / "scores.json").write_text(json.dumps(doc))
    return run


def test_cli_on_run_directories(repo_root, tmp_path):
    """--runs with a quoted glob over two fake runs: one series per run named after its directory, x = the
    consumed tokens of the evaluated step (the last row of a replayed step), y = benchmarks.textvqa.score;
    --one-series pools them, --benchmark average reads "average", --x samples the samples, --y-key loss
    every step's loss. Faults caught: the first row of a replayed step winning, iter_N or step_N dirs
    not read, --one-series ignored."""
    steps = [100, 200, 400, 800, 1600]
    for name, tps, base in (("probe_a", 1000, 30.0), ("probe_b", 3000, 35.0)):
        scores = {s: base + 2.0 * np.log(s * tps) for s in steps}
        _fake_run(tmp_path / "runs", name, 1600, tps, scores, replay_from=1500 if name == "probe_a" else None)
    out = tmp_path / "fits"
    glob = str(tmp_path / "runs" / "probe_*")
    _tool(
        ["--runs", glob, "--benchmark", "textvqa", "--resamples", "50", "--output-dir", str(out)], repo_root
    )
    fit = json.loads((out / "fit.json").read_text())["series"]
    assert set(fit) == {"probe_a", "probe_b"}
    assert fit["probe_a"]["x_range"] == [100 * 1000, 1600 * 1000 + 7]  # step 1600's replayed row
    assert fit["probe_b"]["x_range"] == [100 * 3000, 1600 * 3000]
    assert fit["probe_b"]["log_linear"]["b"] == pytest.approx(2.0, abs=1e-6)
    assert fit["probe_b"]["n_points"] == 5
    _tool(["--runs", glob, "--benchmark", "average", "--one-series", "--x", "samples", "--resamples", "50",
           "--output-dir", str(out)], repo_root)  # fmt: skip
    pooled = json.loads((out / "fit.json").read_text())
    assert pooled["n_points"] == 10 and pooled["x_range"] == [1000, 16000]
    _tool(["--runs", str(tmp_path / "runs" / "probe_b"), "--y-key", "loss", "--min-x", "30000", "--max-points",
           "60", "--resamples", "20", "--no-plot", "--output-dir", str(out)], repo_root)  # fmt: skip
    loss = json.loads((out / "fit.json").read_text())  # loss = 3 / step, steps 10..1600 kept, thinned to 60
    assert loss["x_range"] == [30000, 1600 * 3000] and 50 <= loss["n_points"] <= 60
    assert any("thinned 1591 points" in note for note in loss["notes"])
    assert loss["power_law"]["a"] < 0 and loss["power_law"]["b"] == pytest.approx(1.0, rel=1e-3)


def test_cli_errors_name_the_file_and_what_to_do(repo_root, tmp_path):
    """An evaluated step with no metrics row, an unknown benchmark and a bad JSONL line stop the tool with
    exit status 2 and a message naming the file (and line or step); a series with too few points exits 1.
    Faults caught: a step without a row read as x = 0 (or skipped silently), a bad line skipped."""
    run = _fake_run(tmp_path, "probe", 50, 1000, {20: 40.0, 40: 41.0, 80: 42.0})
    proc = _tool(["--runs", str(run), "--benchmark", "textvqa", "--output-dir", str(tmp_path / "o")], repo_root,
                 check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "scores.json: step 80 has no row in" in proc.stderr and "metrics.jsonl" in proc.stderr
    proc = _tool(["--runs", str(run), "--benchmark", "mmmu", "--output-dir", str(tmp_path / "o")], repo_root,
                 check=False)  # fmt: skip
    assert proc.returncode == 2 and "no benchmark 'mmmu'; it has textvqa" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1e9, "y": 40}\n{"x": 2e9, "y": }\n')
    proc = _tool(["--points", str(bad), "--output-dir", str(tmp_path / "o")], repo_root, check=False)
    assert proc.returncode == 2 and f"{bad}:2: not JSON" in proc.stderr
    few = _write_jsonl(tmp_path / "few.jsonl", [{"x": 1e9, "y": 40}, {"x": 2e9, "y": 41}])
    proc = _tool(["--points", few, "--no-plot", "--output-dir", str(tmp_path / "o")], repo_root, check=False)
    assert proc.returncode == 1 and "needs at least 3 points" in proc.stdout


def test_cli_chinchilla_points(repo_root, tmp_path):
    """{n, d, loss} points select the Chinchilla fit: fit.json holds E, A, B, alpha, beta with intervals and
    the loss predicted at --predict-at N,D; the plot is written; the starts run in 2 worker processes. Fault caught: the points read as curve
    points (no "chinchilla" entry)."""
    n, d, loss = _chinchilla_points()
    rows = [{"n": a, "d": b, "loss": c} for a, b, c in zip(n, d, loss, strict=True)]
    points = _write_jsonl(tmp_path / "loss.jsonl", rows)
    out = tmp_path / "fits"
    proc = _tool(["--points", points, "--predict-at", "7e10,1.4e12", "--starts-stride", "45", "--resamples",
                  "5", "--workers", "2", "--output-dir", str(out)], repo_root)  # fmt: skip
    fit = json.loads((out / "fit.json").read_text())
    c = fit["chinchilla"]
    assert c["E"] == pytest.approx(1.69, rel=1e-3) and c["beta"] == pytest.approx(0.28, rel=1e-3)
    assert c["starts"] == 100 and len(c["alpha_ci"]) == 2
    assert fit["prediction"]["y"] == pytest.approx(1.69 + 406.4 / 7e10**0.34 + 410.7 / 1.4e12**0.28, rel=1e-4)
    assert "| alpha | 0.34 |" in proc.stdout
    assert (out / "fit.png").stat().st_size > 10_000
