"""Benchmark files: the JSONL format, VLMEvalKit's TSVs, the errors users see, and the prompts."""

import base64
import csv
import json
import os

import pytest

from megasail.evaluation import (
    BenchmarkError,
    default_prompt_suffix,
    format_prompt,
    load_benchmark,
)
from megasail.evaluation.tsv import metric_from_name


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def write_tsv(path, header, rows):
    """As pandas' to_csv(sep="\\t") writes it: minimal quoting."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def images(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "imgs" / name).write_bytes(b"jpeg")
    return tmp_path


def test_jsonl_reads_every_field(images):
    path = write_jsonl(
        images / "my_mc.jsonl",
        [
            {"id": 1, "image": ["imgs/a.jpg", "imgs/b.jpg"], "question": "Which?", "answers": ["B"],
             "metric": "mc", "options": {"B": "blue", "A": "red"}, "category": "color", "group": 7},
            {"id": "2", "image": "imgs/a.jpg", "question": "Which?", "answers": ["A"], "options": {"A": "x", "B": "y"}},
        ],
    )  # fmt: skip
    bench = load_benchmark(path)
    assert (bench.name, bench.metric, len(bench)) == ("my_mc", "mc", 2)
    first = bench.items[0]
    assert first.id == "1" and first.group == "7" and first.category == "color"
    assert first.images == [str(images / "imgs" / "a.jpg"), str(images / "imgs" / "b.jpg")]
    assert list(first.options) == ["A", "B"]  # letter order, whatever the file's order
    assert bench.prompt_suffix == "Answer with the option's letter from the given choices directly."
    assert load_benchmark(path, prompt_suffix="").prompt_suffix == ""


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"id": 1, "question": "q", "answers": ["a"], "metric": "vqa"}', "{not json"], ":2: not valid JSON"),
        (['{"id": 1, "question": "q", "answer": "a", "metric": "vqa"}'], ":1: missing 'answers' (found 'answer'"),
        (['{"id": 1, "question": "q", "answers": ["a"]}'], ":1: no 'metric' in the file"),
        (['{"id": 1, "question": "q", "answers": ["a"], "metric": "bleu"}'], ":1: unknown metric 'bleu'"),
        (
            ['{"id": 1, "question": "q", "answers": ["a"], "metric": "vqa"}',
             '{"id": 2, "question": "q", "answers": ["a"], "metric": "anls"}'],
            ":2: metric 'anls' differs from 'vqa'",
        ),
        (
            ['{"id": 1, "question": "q", "answers": ["a"], "metric": "vqa"}', "",
             '{"id": 1, "question": "q", "answers": ["b"]}'],
            ":3: duplicate id '1' (first at ",
        ),
        (['{"id": 1, "question": "q", "answers": ["C"], "metric": "mc", "options": {"A": "x", "B": "y"}}'],
         ":1: the answer 'C' is not one of the option letters A, B"),
        (['{"id": 1, "question": "q", "answers": ["yes"], "metric": "mme", "category": "count"}'],
         ":1: metric 'mme' needs 'group'"),
        (['{"id": 1, "question": "q", "answers": ["yes"], "metric": "mme", "category": "cars", "group": 1}'],
         ":1: MME category 'cars'"),
        (['{"id": 1, "question": "q", "answers": ["maybe"], "metric": "pope"}'], ":1: metric 'pope' needs the answer"),
        (['{"id": 1, "question": "q", "answers": ["a"], "metric": "anls", "image": "http://x/y.jpg"}'],
         ":1: image 'http://x/y.jpg' is a URL"),
        (['{"id": 1, "question": "q", "answers": ["a"], "metric": "vqa"}'], ":1: metric 'vqa' scores against"),
    ],
)  # fmt: skip
def test_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    """Fault caught: a bad line accepted, or reported without its file:line."""
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchmarkError) as error:
        load_benchmark(str(path))
    assert str(error.value).startswith(str(path) + ":")
    assert message in str(error.value)


def test_missing_image_reports_where_it_was_looked_for(tmp_path):
    """Fault caught: an image path resolved against the working directory instead of the file's folder."""
    (tmp_path / "sub").mkdir()
    path = write_jsonl(
        tmp_path / "sub" / "b.jsonl",
        [{"id": 1, "image": "../pics/x.png", "question": "q", "answers": ["a"], "metric": "vqa"}],
    )
    with pytest.raises(BenchmarkError) as error:
        load_benchmark(path)
    resolved = os.path.join(str(tmp_path), "pics", "x.png")
    assert f"{path}:1: image '../pics/x.png' not found (resolved to {resolved}" in str(error.value)


def test_metric_override_wins_over_the_file(images):
    path = write_jsonl(images / "b.jsonl", [{"id": 1, "question": "q", "answers": ["a"], "metric": "vqa"}])
    assert load_benchmark(path, metric="anls").metric == "anls"
    assert load_benchmark(path, metric="anls").prompt_suffix == default_prompt_suffix("anls")


def test_prompts_are_internvl_strings():
    """The exact instructions of InternVL's evaluation scripts (cited in benchmarks.py)."""
    short = "Answer the question using a single word or phrase."
    assert default_prompt_suffix("vqa") == default_prompt_suffix("anls") == short
    assert default_prompt_suffix("mc") == "Answer with the option's letter from the given choices directly."
    assert default_prompt_suffix("mme") == short
    assert default_prompt_suffix("pope") == "Please answer yes or no. " + short


def test_format_prompt_lists_options_one_per_line(images):
    path = write_jsonl(
        images / "b.jsonl",
        [
            {
                "id": 1,
                "question": "Colour?",
                "answers": ["A"],
                "metric": "mc",
                "options": {"B": "blue", "A": "red"},
            }
        ],
    )
    bench = load_benchmark(path)
    assert format_prompt(bench.items[0], bench.prompt_suffix) == (
        "Colour?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    )
    assert format_prompt(bench.items[0], "") == "Colour?\nA. red\nB. blue"


# ---- VLMEvalKit TSV -----------------------------------------------------------------------------


def b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode()


PIXELS = [bytes([i]) * 60 for i in range(3)]  # base64 longer than VLMEvalKit's 64-character reference cells


@pytest.mark.parametrize(
    "name, metric",
    [
        ("MMBench_DEV_EN_V11.tsv", "mc"),
        ("SEEDBench_IMG.tsv", "mc"),
        ("AI2D_TEST.tsv", "mc"),
        ("MME.tsv", "mme"),
        ("POPE.tsv", "pope"),
        ("OCRBench.tsv", "ocrbench"),
        ("TextVQA_VAL.tsv", "vqa"),
        ("DocVQA_VAL.tsv", "anls"),
        ("InfoVQA_VAL.tsv", "anls"),
    ],
)
def test_tsv_metric_from_name(name, metric):
    assert metric_from_name(name) == metric


@pytest.mark.parametrize(
    "name", ["ChartQA_TEST.tsv", "OCRBench_v2.tsv", "MME-RealWorld.tsv", "MMMU_DEV_VAL.tsv"]
)
def test_tsv_unknown_name_needs_a_metric(tmp_path, name):
    """Fault caught: a name merely starting like a known one (OCRBench_v2, MME-RealWorld) scored with the
    wrong metric."""
    path = write_tsv(tmp_path / name, ["index", "question", "answer"], [["1", "q", "a"]])
    with pytest.raises(BenchmarkError, match="cannot tell the metric from the file name.*pass metric="):
        load_benchmark(path)
    assert load_benchmark(path, metric="anls").metric == "anls"


def test_tsv_mmbench_circular_groups_references_and_hints(tmp_path):
    """Rotations at index + 1e6 share a group and (through a short reference cell) the image bytes.

    Fault caught: groups not taken as index % 1e6; reference cells decoded as base64; the hint dropped;
    an empty option column kept.
    """
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [
        ["0", "Colour?", "Look left.", "red", "blue", "green", "", "A", "color", b64(PIXELS[0])],
        ["1", "Shape?", "", "round", "square", "", "", "B", "shape", b64(PIXELS[1])],
        ["1000000", "Colour?", "Look left.", "blue", "green", "red", "", "C", "color", "0"],
        ["1000001", "Shape?", "", "square", "round", "", "", "A", "shape", "1"],
    ]
    bench = load_benchmark(write_tsv(tmp_path / "MMBench_DEV_EN.tsv", header, rows))
    assert bench.metric == "mc"
    assert [it.group for it in bench.items] == ["0", "1", "0", "1"]
    assert [it.images for it in bench.items] == [[PIXELS[0]], [PIXELS[1]], [PIXELS[0]], [PIXELS[1]]]
    assert bench.items[0].question == "Look left.\nColour?"
    assert bench.items[0].options == {"A": "red", "B": "blue", "C": "green"}
    assert bench.items[3].answers == ["A"]


def test_tsv_non_circular_mc_has_no_groups(tmp_path):
    header = ["index", "question", "A", "B", "answer", "image"]
    bench = load_benchmark(
        write_tsv(tmp_path / "AI2D_TEST.tsv", header, [["3", "q", "x", "y", "B", b64(PIXELS[0])]])
    )
    assert bench.items[0].group is None


def test_tsv_list_answers_quotes_tabs_and_big_images(tmp_path):
    """A question holding a tab and quotes, an answer list literal, an image past csv's 128 KiB field limit.

    Fault caught: answer lists read as one string; csv's default field limit left in place.
    """
    big = os.urandom(200_000)
    rows = [["5", 'Say "hi"\tthere', "['Hi', 'hello', 'hi', 'hey']", b64(big)]]
    bench = load_benchmark(
        write_tsv(tmp_path / "TextVQA_VAL.tsv", ["index", "question", "answer", "image"], rows)
    )
    item = bench.items[0]
    assert (item.question, item.answers, item.images) == (
        'Say "hi"\tthere',
        ["Hi", "hello", "hi", "hey"],
        [big],
    )


def test_tsv_mme_pairs_by_image_path_else_by_image(tmp_path):
    """Fault caught: MME questions grouped per row (acc+ would become acc) or across categories."""
    header = ["index", "question", "answer", "category", "image"]
    rows = [
        ["0", "Is it a cat? Please answer yes or no.", "Yes", "existence", b64(PIXELS[0])],
        ["1", "Is it a dog? Please answer yes or no.", "No", "existence", "0"],
        ["2", "Two cats? Please answer yes or no.", "Yes", "count", b64(PIXELS[1])],
        ["3", "Three cats? Please answer yes or no.", "No", "count", b64(PIXELS[1])],
    ]
    bench = load_benchmark(write_tsv(tmp_path / "MME.tsv", header, rows))
    groups = [it.group for it in bench.items]
    assert groups[0] == groups[1] and groups[2] == groups[3] and groups[0] != groups[2]
    assert [it.answers for it in bench.items] == [["yes"], ["no"], ["yes"], ["no"]]
    # MME's folders each number their images from 0001.jpg: the same name in two categories is two images
    rows = [r + [p] for r, p in zip(rows, ["0001.jpg", "0001.jpg", "0001.jpg", "0002.jpg"], strict=True)]
    bench = load_benchmark(write_tsv(tmp_path / "MME.tsv", header + ["image_path"], rows))
    groups = [it.group for it in bench.items]
    assert groups[0] == groups[1] and len(set(groups)) == 3


@pytest.mark.parametrize(
    "rows, message",
    [
        ([["1", "q", "a", "!!not base64!!" * 8]], ":2: 'image' is not valid base64"),
        ([["1", "q", "a", "42"]], ":2: image cell '42' names no row"),
        ([["1", "q", "a", b64(PIXELS[0])], ["1", "q", "b", b64(PIXELS[1])]], ":3: duplicate id '1'"),
        ([["1", "q", "a"]], ":2: 3 fields for 4 columns"),
    ],
)
def test_tsv_errors_name_file_and_line(tmp_path, rows, message):
    path = write_tsv(tmp_path / "TextVQA_VAL.tsv", ["index", "question", "answer", "image"], rows)
    with pytest.raises(BenchmarkError, match=message):
        load_benchmark(path)


def test_tsv_without_answers_is_refused(tmp_path):
    path = write_tsv(
        tmp_path / "MMBench_TEST_EN.tsv", ["index", "question", "A", "B"], [["1", "q", "x", "y"]]
    )
    with pytest.raises(BenchmarkError, match=r":1: no 'answer' column \(a test split"):
        load_benchmark(path)
