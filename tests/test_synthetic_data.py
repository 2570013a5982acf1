"""tools/make_synthetic_data.py: deterministic shape pictures whose captions are true, a usable tokenizer."""

from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from megasail.data.text.tokenizer import IM_END, IMG_CONTEXT, REQUIRED_SPECIAL_TOKENS, MultimodalTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import make_synthetic_data as synth  # noqa: E402

# Independent of the tool's tables: what a caption's words must mean in the picture.
RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "black": (20, 20, 20),
}
ROWS = {"top": 0, "bottom": 2}
COLS = {"left": 0, "right": 2}
PHRASE = re.compile(r"a (\w+) (circle|square|triangle|diamond) (?:at|on|in) the ([a-z ]+?)(?:,| and |$)")


def _cell(place: str) -> tuple[int, int]:
    words = place.split()
    row = next((ROWS[w] for w in words if w in ROWS), 1)
    col = next((COLS[w] for w in words if w in COLS), 1)
    return row, col


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Pictures of 1-3 shapes (the geometry and caption joins of several); the default is one."""
    out = tmp_path_factory.mktemp("synth")
    synth.make_dataset(str(out), samples=60, heldout=10, seed=3, max_shapes=3)
    return out


def _records(path):
    return [json.loads(line) for line in open(path)]


def test_same_seed_same_bytes_other_seed_other_data(data, tmp_path):
    """Fails if the seed is not the only source of randomness (e.g. an unseeded rng) or is ignored."""
    again = tmp_path / "again"
    synth.make_dataset(str(again), samples=60, heldout=10, seed=3, max_shapes=3)
    for name in (
        "captions.jsonl",
        "heldout.jsonl",
        "tokenizer/sp.model",
        "images/train_000007.png",
        "images/train_000007.jpg",
        "images/heldout_000003.png",
        "images/heldout_000003.jpg",
    ):
        if (data / name).exists() or (again / name).exists():
            assert filecmp.cmp(data / name, again / name, shallow=False), name
    other = tmp_path / "other"
    synth.make_dataset(str(other), samples=60, heldout=0, seed=4, max_shapes=3)
    assert _records(other / "captions.jsonl") != _records(data / "captions.jsonl")


def test_training_split_does_not_depend_on_heldout(data, tmp_path):
    """Fails if the held-out samples are drawn from the training split's random stream."""
    no_heldout = tmp_path / "no_heldout"
    synth.make_dataset(str(no_heldout), samples=60, heldout=0, seed=3, max_shapes=3)
    assert _records(no_heldout / "captions.jsonl") == _records(data / "captions.jsonl")
    train = {r["caption"] for r in _records(data / "captions.jsonl")}
    held = [r["caption"] for r in _records(data / "heldout.jsonl")]
    assert len(held) == 10 and not os.path.exists(no_heldout / "heldout.jsonl")
    assert sum(c not in train for c in held) >= 5  # a separate stream, not a copy of the first samples


def test_captions_say_what_is_where(data):
    """Fails if a caption names a colour or place the picture does not have there (e.g. rows swapped,
    colours mislabelled), or if shapes are drawn where the caption is silent."""
    sizes = set()
    for rec in _records(data / "captions.jsonl") + _records(data / "heldout.jsonl"):
        img = np.asarray(Image.open(data / rec["image"]).convert("RGB")).astype(int)
        h, w, _ = img.shape
        sizes.add((w, h))
        background = np.median(img.reshape(-1, 3), 0)  # shapes cover under a third of the picture
        phrases = PHRASE.findall(rec["caption"])
        assert phrases and len(phrases) == rec["caption"].count(" a ") + 1, rec["caption"]
        named = {}
        for colour, _shape, place in phrases:
            named[_cell(place)] = colour
        for row in range(3):
            for col in range(3):
                cell = img[row * h // 3 : (row + 1) * h // 3, col * w // 3 : (col + 1) * w // 3].reshape(
                    -1, 3
                )
                if (row, col) in named:
                    dist = np.abs(cell - np.array(RGB[named[(row, col)]])).max(1)
                    assert (dist < 50).mean() > 0.02, (rec, row, col)
                else:
                    strong = np.abs(cell - background).max(1) > 100
                    assert strong.mean() < 0.02, (rec, row, col)
    assert len(sizes) > 30 and min(w / h for w, h in sizes) < 0.7 and max(w / h for w, h in sizes) > 1.4


def test_default_pictures_hold_one_large_shape(tmp_path):
    """Fails if the default is not one shape per picture (the quickstart relies on it), if shapes are
    small (under half of a cell's shorter side: a few ViT patches at 448px), or if --max-shapes is
    not range-checked."""
    synth.make_dataset(str(tmp_path), samples=40, seed=5)
    for rec in _records(tmp_path / "captions.jsonl"):
        (colour, _shape, place), *rest = PHRASE.findall(rec["caption"]) or [(None, None, None)]
        assert colour and not rest, rec["caption"]
        img = np.asarray(Image.open(tmp_path / rec["image"]).convert("RGB")).astype(int)
        h, w, _ = img.shape
        row, col = _cell(place)
        cell = img[row * h // 3 : (row + 1) * h // 3, col * w // 3 : (col + 1) * w // 3]
        painted = np.abs(cell - np.array(RGB[colour])).max(2) < 50
        side = min(h, w) / 3
        # the shape's bounding box spans at least half the cell's shorter side (JPEG edges aside)
        ys, xs = np.nonzero(painted)
        assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 2 >= 0.5 * side, rec
    for bad in (0, 10):
        with pytest.raises(ValueError, match="--max-shapes"):
            synth.make_dataset(str(tmp_path / "bad"), samples=2, max_shapes=bad)


def test_tokenizer_holds_template_tokens_and_whole_words(data):
    """Fails if the chat/image tokens are missing from the model, or are matched inside text
    (user-defined instead of control symbols), or if the vocabulary is too small for whole words."""
    tok = MultimodalTokenizer.load(str(data / "tokenizer"))
    assert tok.kind == "sentencepiece" and tok.added_tokens == {}  # nothing appended: all in the model
    ids = [tok.token_id(t) for t in REQUIRED_SPECIAL_TOKENS]
    assert len(set(ids)) == 5 and max(ids) < tok.vocab_size
    assert tok.token_id(IM_END) not in tok.encode("a red circle" + IM_END)
    assert len(tok.encode(" ".join(["a"] + list(RGB) + ["circle", "square", "triangle", "diamond"]))) == 11
    summary = json.loads((data / "summary.json").read_text())
    assert summary["image_token_id"] == tok.token_id(IMG_CONTEXT) and summary["vocab_size"] == tok.vocab_size


def test_cli_output_preprocesses_without_rejects(tmp_path):
    """Fails if the written JSONL, images or tokenizer are not what tools/preprocess_data.py reads."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    run = [
        sys.executable,
        os.path.join(REPO, "tools", "make_synthetic_data.py"),
        "--output",
        str(tmp_path / "d"),
        "--samples",
        "12",
        "--heldout",
        "3",
    ]
    subprocess.run(run, check=True, env=env, capture_output=True)
    prefix = tmp_path / "p"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "preprocess_data.py"),
            "--input",
            str(tmp_path / "d" / "captions.jsonl"),
            "--tokenizer",
            str(tmp_path / "d" / "tokenizer"),
            "--max-tiles",
            "1",
            "--max-seq-length",
            "512",
            "--output-prefix",
            str(prefix),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "p.manifest.json").read_text())
    assert manifest["counts"]["written"] == 12 and manifest["counts"]["rejected"] == 0
    bad = subprocess.run(run[:-4] + ["--samples", "0"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--samples" in bad.stderr


def test_benchmark_questions_are_true_of_their_pictures(tmp_path):
    """--benchmark N writes, per question kind, N questions about one-shape held-out pictures whose
    answers are what the picture's caption says (captions are checked against the pixels above), in
    tools/evaluate.py's format (its loader reads them).
    Fault caught: questions paired with the next picture's shape (answers off by one picture); the
    middle cells phrased "at the top" / "at the bottom" (then inside "at the top left": the substring
    rule scored a wrong place right)."""
    from megasail.evaluation.benchmarks import load_benchmark

    synth.make_dataset(str(tmp_path), samples=30, heldout=30, seed=7, benchmark=12)
    held = {r["id"]: r for r in _records(tmp_path / "heldout.jsonl")}
    for kind in ("colour", "shape", "where", "what_is_where"):
        path = tmp_path / "benchmark" / f"{kind}.jsonl"
        bench = load_benchmark(str(path))
        assert bench.metric == "ocrbench" and len(bench.items) == 12
        for item, line in zip(bench.items, _records(path), strict=True):
            caption = held[line["picture"]]["caption"]
            ((colour, shape, place),) = PHRASE.findall(caption)
            assert item.images == [str(tmp_path / held[line["picture"]]["image"])]
            answer = item.answers[0]
            if kind in ("colour", "shape"):
                assert answer == {"colour": colour, "shape": shape}[kind], line
            elif kind == "where":
                assert answer.endswith(f" the {place}") and caption.endswith(answer), line
            else:
                assert answer == caption.removeprefix("a "), line
    places = [p for _, _, p in (PHRASE.findall(r["caption"])[0] for r in held.values())]
    for a in set(places):
        for b in set(places) - {a}:
            assert f"the {a}" not in f"the {b}", (a, b)
    with pytest.raises(ValueError, match="--benchmark"):
        synth.make_dataset(str(tmp_path / "bad"), samples=2, heldout=3, benchmark=4)
