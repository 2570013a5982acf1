"""Paired bootstrap of the benchmark average, on cases whose intervals can be worked out by hand."""

import math

import numpy as np
import pytest

from megasail.evaluation import Benchmark, BenchmarkItem, average_score, paired_bootstrap, score_benchmark

COLOURS = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}


def yes_no_benchmark(name, n):
    """POPE-style: every truth is "yes", so a prediction is right exactly when it says yes."""
    items = [BenchmarkItem(id=str(i), images=[], question="q", answers=["yes"]) for i in range(n)]
    return Benchmark(name=name, path="", metric="pope", items=items, prompt_suffix="")


def said(right):
    return {str(i): ("Yes" if r else "No") for i, r in enumerate(right)}


def test_identical_predictions_give_exactly_zero():
    """Fault caught: a and b resampled with different draws (the interval would straddle 0, not be [0, 0])."""
    bench = yes_no_benchmark("pope", 50)
    right = np.random.default_rng(1).random(50) < 0.6
    result = paired_bootstrap([bench], {"pope": said(right)}, {"pope": said(right)}, n_resamples=200)
    assert result["interval"] == [0.0, 0.0]
    assert result["difference"] == 0.0 and result["mean_difference"] == 0.0


def test_interval_matches_the_paired_normal_approximation():
    """400 questions; b is right wherever a is, and on 100 more. The paired differences are 0/1 with
    p = 1/4: difference 25 points, standard error 100 sqrt(p (1 - p) / 400) = 2.165, so the 95% interval
    is about 25 -/+ 1.96 x 2.165 = [20.76, 29.24]; it lies above 0.

    Fault caught: a and b resampled independently (unpaired: standard error 3.31, interval 25 -/+ 6.5).
    """
    bench = yes_no_benchmark("pope", 400)
    a = [i < 200 for i in range(400)]
    b = [i < 300 for i in range(400)]
    result = paired_bootstrap([bench], {"pope": said(a)}, {"pope": said(b)}, n_resamples=4000, seed=3)
    assert result["difference"] == pytest.approx(25.0)
    half_width = 1.96 * 100 * math.sqrt(0.25 * 0.75 / 400)
    assert result["interval"][0] == pytest.approx(25 - half_width, abs=0.6)
    assert result["interval"][1] == pytest.approx(25 + half_width, abs=0.6)
    assert result["interval"][0] > 0
    assert result["mean_difference"] == pytest.approx(25.0, abs=0.3)


def test_circular_groups_are_resampled_whole():
    """50 questions x 4 rotations; a gets nothing right; b gets every rotation of 25 questions and 3 of 4 of
    the other 25. Unit = group: differences 0/1 with p = 1/2 over 50 units, difference 50, standard error
    100 sqrt(0.25 / 50) = 7.07, interval about [36.1, 63.9] (the draws count whole groups, steps of 2).

    Fault caught: rotations resampled as separate questions (the groups break up and the score is no longer
    over whole questions).
    """
    letters = "ABCD"
    items = [
        BenchmarkItem(
            id=f"{g}-{r}", images=[], question="q", answers=[letters[r]], options=COLOURS, group=str(g)
        )
        for g in range(50)
        for r in range(4)
    ]
    bench = Benchmark(name="mmbench", path="", metric="mc", items=items, prompt_suffix="")
    a = {it.id: "Z" for it in items}
    b = {it.id: it.answers[0] if (int(it.group) < 25 or not it.id.endswith("-3")) else "A" for it in items}
    result = paired_bootstrap([bench], {"mmbench": a}, {"mmbench": b}, n_resamples=4000, seed=5)
    assert result["difference"] == pytest.approx(50.0)
    assert result["benchmarks"]["mmbench"]["units"] == 50
    half_width = 1.96 * 100 * math.sqrt(0.25 / 50)
    assert result["interval"][0] == pytest.approx(50 - half_width, abs=2.5)
    assert result["interval"][1] == pytest.approx(50 + half_width, abs=2.5)


def test_coverage_on_a_known_population():
    """Questions where a is right with probability 0.5 and b with 0.6, independently: the true difference
    is 10 points. Over 300 simulated benchmarks of 200 questions, the 95% interval should hold 10 in about
    95% of them (the percentile bootstrap runs a little under at this size).

    Fault caught: the interval from the 5th-95th percentiles (about 90% coverage) or from too few units
    per resample (too wide: coverage near 100%).
    """
    rng = np.random.default_rng(11)
    bench = yes_no_benchmark("pope", 200)
    covered = 0
    for trial in range(300):
        a, b = rng.random(200) < 0.5, rng.random(200) < 0.6
        result = paired_bootstrap([bench], {"pope": said(a)}, {"pope": said(b)}, n_resamples=400, seed=trial)
        covered += result["interval"][0] <= 10.0 <= result["interval"][1]
    assert 0.915 <= covered / 300 <= 0.98


def test_average_over_benchmarks_and_mme_strata():
    """MME with 3 images of existence and 1 of OCR (a yes and a no question each); a says yes to all,
    b is right on existence and says yes to all of OCR. MME on 0-100 (the mean over categories of
    (acc + acc+) / 2): a (50 + 0) / 2 on both = 25; b (200 + 50) / 4 = 62.5. POPE: a 50, b 75. Averages:
    a (50 + 25) / 2 = 37.5, b (75 + 62.5) / 2 = 68.75.

    Fault caught: MME's categories pooled into one stratum (b's MME would be 50 (7/8 + 3/4) = 81.25).
    """
    pope = yes_no_benchmark("pope", 20)
    mme_items = [
        BenchmarkItem(id=f"{c}{k}", images=[], question="q", answers=["yes" if k % 2 == 0 else "no"],
                      category=c, group=f"{c}{k // 2}")
        for c, images in (("existence", 3), ("OCR", 1)) for k in range(2 * images)
    ]  # fmt: skip
    mme = Benchmark(name="mme", path="", metric="mme", items=mme_items, prompt_suffix="")
    a = {"pope": said([i % 2 == 0 for i in range(20)]), "mme": {it.id: "Yes" for it in mme_items}}
    b = {
        "pope": said([i % 4 != 3 for i in range(20)]),
        "mme": {it.id: it.answers[0] if it.category == "existence" else "Yes" for it in mme_items},
    }
    result = paired_bootstrap([pope, mme], a, b, n_resamples=300)
    assert result["benchmarks"]["mme"]["a"] == pytest.approx(25.0)
    assert result["benchmarks"]["mme"]["b"] == pytest.approx(62.5)
    assert (result["a"], result["b"]) == (pytest.approx(37.5), pytest.approx(68.75))
    for side, predictions in (("a", a), ("b", b)):
        scores = {bench.name: score_benchmark(bench, predictions[bench.name]) for bench in (pope, mme)}
        assert result[side] == pytest.approx(average_score(scores))
    assert result["benchmarks"]["mme"]["units"] == 4
    assert all(math.isfinite(x) for x in result["interval"]) and result["interval"][0] > 0


def test_missing_benchmark_predictions_are_named():
    bench = yes_no_benchmark("pope", 3)
    with pytest.raises(ValueError, match="predictions_b has none for pope"):
        paired_bootstrap([bench], {"pope": {}}, {}, n_resamples=10)
