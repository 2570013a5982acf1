"""A dataset without samples: preprocessing that keeps none exits 5 naming why, training refuses such a
prefix at start-up naming the stage, and the loader refuses it when a library user hands it one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fixtures.multimodal_data import conversation, make_tiny_tokenizer, write_jsonl
from train_utils import REPO, TINY_YAML

from megasail.config import load_config
from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
from megasail.data.loader.curriculum import EmptySourceError
from megasail.data.loader.data_loader import MultimodalDataLoader
from megasail.data.preprocess import NoSamplesKept, PreprocessConfig, run_preprocess
from megasail.training.checks import StartupError, check_run

# every record is bad: 5 missing images, 2 malformed lines, 1 record without conversations, 1 empty one
BAD_RECORDS = (
    [conversation(f"missing_{i}.jpg", "<image>\nWhat is it?", "A cat.", id=f"m{i}") for i in range(5)]
    + [b"{broken", b"[1, 2"]
    + [{"id": "nofield", "image": "x.jpg"}]
    + [{"id": "empty", "conversations": []}]
)


def _tool(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def rejected(tmp_path_factory):
    """(prefix, tokenizer, run) of a preprocessing run whose every record is rejected."""
    root = tmp_path_factory.mktemp("empty")
    tokenizer = make_tiny_tokenizer(str(root / "tok"))
    jsonl = write_jsonl(str(root / "bad.jsonl"), BAD_RECORDS)
    prefix = root / "bad"
    run = _tool("--input", jsonl, "--tokenizer", tokenizer, "--output-prefix", prefix, "--no-progress")
    return str(prefix), tokenizer, run


def test_a_run_that_keeps_no_sample_exits_5_naming_the_top_reasons(rejected, tmp_path):
    """Exit status 5 (not 0), the three most frequent reasons with their counts, most first, how many
    other reasons, and the rejects file; the prefix is still written, its manifest saying 0 samples. An
    input without records exits 5 too, and run_preprocess raises NoSamplesKept carrying the manifest.

    Fault caught: run_preprocess without the zero-sample check (exit 0, "0 samples" on stdout only)."""
    prefix, tokenizer, run = rejected
    assert run.returncode == 5, (run.returncode, run.stderr)
    err = run.stderr
    assert f"{prefix}: no sample kept: all 9 records read were rejected" in err
    lines = [line.split() for line in err.splitlines() if line.startswith("  ")]
    assert [words[:2] for words in lines[:3]] == [["5", "image_missing:"], ["2", "malformed_json:"],
                                                   ["1", "empty_conversation:"]]
    assert "--image-root" in err  # the hint of the most frequent reason
    assert "... and 1 more reason(s)" in err and f"{prefix}.rejects.jsonl" in err
    manifest = json.loads(open(f"{prefix}.manifest.json").read())
    assert manifest["num_samples"] == 0 and manifest["rejected_by_reason"]["missing_field"] == 1
    assert len(open(f"{prefix}.rejects.jsonl").read().splitlines()) == 9

    blank = write_jsonl(str(tmp_path / "blank.jsonl"), [])
    run = _tool("--input", blank, "--tokenizer", tokenizer, "--output-prefix", tmp_path / "blank", "--no-progress")
    assert run.returncode == 5 and "the inputs hold no records" in run.stderr, run.stderr
    with pytest.raises(NoSamplesKept, match="no sample kept") as caught:
        run_preprocess(PreprocessConfig(inputs=[blank], output_prefix=str(tmp_path / "lib"), tokenizer=tokenizer,
                                        progress=False))
    assert caught.value.result["manifest"]["num_samples"] == 0


def _stub_manifest(prefix: str, samples: int) -> str:
    with open(f"{prefix}.manifest.json", "w") as f:
        json.dump({"format_version": 1, "num_samples": samples,
                   "image_token_ids": {"img_start": 403, "img_end": 404, "img_context": 405},
                   "tokenizer": {"vocab_size": 410, "special_token_ids": {"<|im_end|>": 401}}}, f)
    return prefix


@pytest.mark.parametrize("role", ["sources", "validation_sources"])
def test_training_refuses_an_empty_source_at_start_up(rejected, tmp_path, role):
    """check_run stops before any step on a stage whose source (or validation source) holds no sample,
    naming the stage, the prefix and the manifest's reject summary.

    Fault caught: read_manifests without check_source_not_empty (check_run passes; training then
    crashed with "position 0 (entry 0) is out of range [0, 0)")."""
    prefix = rejected[0]
    good = _stub_manifest(str(tmp_path / "good"), 10)
    cfg = load_config(TINY_YAML, [])
    second = StageConfig("advance", [SourceConfig(good)], trainable=["projector"])
    setattr(second, role, [SourceConfig(prefix)])
    cfg.data.stages = [StageConfig("align", [SourceConfig(good)], budget_samples=4, trainable=["projector"]), second]
    with pytest.raises(StartupError) as caught:
        check_run(cfg, 1)
    message = str(caught.value)
    assert f"data stage 'advance': source {prefix} holds no samples" in message
    assert "9 records read, 9 rejected (image_missing 5, malformed_json 2, empty_conversation 1 and 1 more" in message
    assert f"{prefix}.rejects.jsonl" in message


def test_the_loader_refuses_an_empty_source_when_built(rejected, tmp_path):
    """MultimodalDataLoader over a curriculum whose second stage draws from an empty prefix raises
    EmptySourceError when built (not hours later when that stage starts), naming stage, prefix, reasons.

    Fault caught: Curriculum without the check at construction (the loader builds, and the stage's
    first batch fails with "position 0 (entry 0) is out of range [0, 0)")."""
    from test_loader import write_prefix

    good = write_prefix(tmp_path / "good", 12, 1)
    stages = [StageConfig("align", [SourceConfig(good)], budget_samples=4),
              StageConfig("advance", [SourceConfig(good), SourceConfig(rejected[0])])]
    config = DataConfig(stages=stages, seq_length=1024, global_batch_size=2, max_tiles=2, num_workers=0,
                        pack_chunk_samples=8, pack_window=4, decode_backend="pil")
    with pytest.raises(EmptySourceError, match=rf"data stage 'advance': source {rejected[0]} holds no samples "
                                               r"\(.*9 records read, 9 rejected \(image_missing 5"):
        MultimodalDataLoader(config)
