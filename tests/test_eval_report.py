"""What an evaluation writes (scores.json, NAME.predictions.jsonl) and the table it prints."""

import json

import pytest

from megasail.evaluation import (
    build_scores,
    format_table,
    read_predictions,
    read_scores,
    write_predictions,
    write_scores,
)
from megasail.evaluation.items import MME_CATEGORIES

SCORES = {
    "TextVQA_VAL": {"metric": "vqa", "n": 5000, "score": 80.0, "missing": 2},
    "POPE": {"metric": "pope", "n": 3, "score": 66.666, "missing": 0, "precision": 50.0, "recall": 100.0,
             "f1": 66.666, "yes_ratio": 66.666},
    "MME": {"metric": "mme", "n": 2374, "score": 1400.0, "missing": 0, "perception": 1100.0, "cognition": 300.0,
            "per_category": {c: {"acc": 0.0, "acc_plus": 0.0, "score": 100.0} for c in MME_CATEGORIES}, "other": 0},
    "OCRBench": {"metric": "ocrbench", "n": 1000, "score": 600, "missing": 0, "accuracy": 60.0,
                 "per_category": {}},
}  # fmt: skip


def test_scores_round_trip_with_average(tmp_path):
    """Fault caught: average over raw scores (mme points, ocrbench hits) instead of the 0-100 ones."""
    scores = build_scores(SCORES)
    assert scores["average"] == pytest.approx((80.0 + 66.666 + 1400 / 28 + 60.0) / 4)
    path = write_scores(str(tmp_path / "out"), scores)
    assert path == str(tmp_path / "out" / "scores.json")
    assert read_scores(str(tmp_path / "out")) == scores == read_scores(path)
    assert list(tmp_path.joinpath("out").iterdir()) == [tmp_path / "out" / "scores.json"]  # no temp file left


def test_table_lists_every_benchmark_then_the_average():
    table = format_table(build_scores(SCORES))
    assert table.splitlines() == [
        "| benchmark | metric | n | score | 0-100 | details |",
        "| --- | --- | ---: | ---: | ---: | --- |",
        "| TextVQA_VAL | vqa | 5000 | 80.00 | 80.00 | missing 2 |",
        "| POPE | pope | 3 | 66.67 | 66.67 | P 50.00, R 100.00, F1 66.67, yes 66.67% |",
        "| MME | mme | 2374 | 1400.00 | 50.00 | perception 1100.00, cognition 300.00 |",
        "| OCRBench | ocrbench | 1000 | 600 | 60.00 | hits of 1000 questions |",
        "| average | | | | 64.17 | mean of 4 benchmarks |",
    ]


def test_predictions_round_trip(tmp_path):
    predictions = {"1": "A cat.", "q 2": "ünïcode\nline"}
    path = write_predictions(str(tmp_path), "MMBench_DEV_EN", predictions)
    assert path == str(tmp_path / "MMBench_DEV_EN.predictions.jsonl")
    lines = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert lines == [{"id": "1", "prediction": "A cat."}, {"id": "q 2", "prediction": "ünïcode\nline"}]
    assert read_predictions(path) == predictions


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"id": 1, "prediction": "a"}\n{"id": "1", "prediction": "b"}\n',
            ":2: duplicate id '1' .first on line 1.",
        ),
        ('{"id": 1, "prediction": "a"}\n{"id": 2}\n', ":2: needs"),
        ("oops\n", ":1: not valid JSON"),
    ],
)
def test_bad_predictions_name_the_line(tmp_path, text, message):
    """Fault caught: a repeated id silently overwriting the first prediction."""
    path = tmp_path / "x.predictions.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_predictions(str(path))


def test_files_to_table(tmp_path):
    """A benchmark file and a predictions file on disk, through scoring, to scores.json and the table."""
    from megasail.evaluation import load_benchmark, score_benchmark

    bench_path = tmp_path / "POPE_mini.jsonl"
    rows = [("1", "yes", "Yes"), ("2", "no", "No, there is not."), ("3", "no", "Yes."), ("4", "yes", None)]
    bench_path.write_text(
        "".join(json.dumps({"id": i, "question": "Is there a dog?", "answers": [t], "metric": "pope"}) + "\n"
                for i, t, _ in rows)
    )  # fmt: skip
    bench = load_benchmark(str(bench_path))
    out = tmp_path / "out"
    write_predictions(str(out), bench.name, {i: p for i, _, p in rows if p is not None})
    predictions = read_predictions(str(out / "POPE_mini.predictions.jsonl"))
    write_scores(str(out), build_scores({bench.name: score_benchmark(bench, predictions)}))
    scores = read_scores(str(out))
    # right: 1, 2; wrong: 3 (a yes to a no), 4 (missing): TP 1, FP 1, FN 1 (the missing yes)
    assert scores["benchmarks"]["POPE_mini"]["score"] == 50.0
    assert scores["benchmarks"]["POPE_mini"]["yes_ratio"] == 50.0
    assert format_table(scores).splitlines()[2] == (
        "| POPE_mini | pope | 4 | 50.00 | 50.00 | P 50.00, R 50.00, F1 50.00, yes 50.00%, missing 1 |"
    )
