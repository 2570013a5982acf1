"""tools/inspect_dataset.py on a prefix produced by preprocessing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.multimodal_data import conversation, image_bytes, make_tiny_tokenizer, write_images, write_jsonl

from megasail.data.preprocess import PreprocessConfig, run_preprocess

REPO = Path(__file__).resolve().parents[1]


def inspect(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "inspect_dataset.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    jpeg = image_bytes("JPEG", 900, 500, 7)
    write_images(str(root), {"a.jpg": jpeg})
    jsonl = write_jsonl(
        str(root / "in.jsonl"),
        [
            conversation("a.jpg", "<image>\nWhat is it?", "Noise."),
            {"text": "Only text here."},
            b"{broken",
        ],
    )
    out = root / "ds"
    run_preprocess(
        PreprocessConfig(
            inputs=[jsonl],
            output_prefix=str(out),
            tokenizer=make_tiny_tokenizer(str(root / "tok")),
            max_tiles=4,
            progress=False,
        )
    )
    return out, jpeg


def test_summary_text_and_json(prefix):
    out, _ = prefix
    r = inspect(out)
    assert r.returncode == 0, r.stderr
    assert "samples 2" in r.stdout and "malformed_json" in r.stdout and "histogram" in r.stdout
    summary = json.loads(inspect(out, "--json", "--max-tiles", 1).stdout)["summary"]
    assert summary["samples"] == 2 and summary["images"] == 1 and summary["max_tiles"] == 1
    # text tokens + one image at 1 tile (256 + <img> + </img>)
    assert summary["tokens_per_sample"]["sum"] == summary["text_tokens_per_sample"]["sum"] + 258
    assert summary["tiles_per_image"] == {"1": 1}


def test_sample_render_marks_loss_and_dumps_images(prefix, tmp_path):
    out, jpeg = prefix
    r = inspect(out, "--sample", 0, "--dump-images", tmp_path / "imgs", "--color", "never")
    assert r.returncode == 0, r.stderr
    assert "[[Noise.<|im_end|>]]" in r.stdout and "user\n<image 0: 900x500 jpeg, 3 tiles" in r.stdout
    assert "[[" not in r.stdout.split("assistant")[0]  # nothing before the answer carries loss
    assert (tmp_path / "imgs" / "sample0_image0.jpg").read_bytes() == jpeg
    assert "\x1b[32m" in inspect(out, "--sample", 1, "--color", "always").stdout


def test_incomplete_prefix_is_refused_unless_allowed(prefix, tmp_path):
    out, _ = prefix
    copy = tmp_path / "copy"
    for suffix in (".bin", ".idx", ".img.bin", ".img.idx"):
        Path(f"{copy}{suffix}").write_bytes(Path(f"{out}{suffix}").read_bytes())
    r = inspect(copy)
    assert r.returncode == 2 and "manifest" in r.stderr
    r = inspect(copy, "--allow-incomplete")
    assert r.returncode == 0 and "INCOMPLETE" in r.stdout
