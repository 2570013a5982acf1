"""tools/eval_captions.py: the images-swapped control and the --min-margin verdict the quickstart relies on."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import eval_captions  # noqa: E402

IMG, CTX, END, TEXT = 4, 6, 5, 9  # <img>, <IMG_CONTEXT>, </img>, a caption token
TOKENS_PER_TILE = 2  # a short run of context tokens per tile keeps the rows readable


def _batch(images: list[tuple[int, int]], seq_length: int = 24) -> dict:
    """One packed row of samples `<img> tiles*2 x CTX </img> TEXT`; images: (picture id, tiles) each.
    Every tile's pixels are filled with its picture id, so a swapped tensor says whose picture it is."""
    ids = []
    for _, tiles in images:
        ids += [IMG] + [CTX] * (tiles * TOKENS_PER_TILE) + [END, TEXT]
    input_ids = torch.tensor([ids + [0] * (seq_length - len(ids))])
    pixels = torch.cat([torch.full((tiles, 3, 2, 2), float(pic)) for pic, tiles in images])
    return {"input_ids": input_ids, "pixel_values": pixels}


def _pictures(pixels: torch.Tensor, counts: list[int]) -> list[int]:
    """The picture id of each image (its tiles' fill value) in a pixel_values tensor."""
    return [int(t[0, 0, 0, 0]) for t in torch.split(pixels, counts)]


def test_image_tile_counts_split_adjacent_images():
    """Fails if neighbouring images (</img><img> between them) merge into one run, or a run's tiles are
    miscounted."""
    batch = _batch([(1, 1), (2, 3), (3, 1)])
    two_rows = torch.cat([batch["input_ids"], _batch([(4, 2)])["input_ids"]])
    assert eval_captions.image_tile_counts(two_rows, CTX, TOKENS_PER_TILE) == [1, 3, 1, 2]


def test_swapped_pixels_give_every_image_the_previous_picture_of_its_size():
    """Every image of every batch is scored against the previous image with as many tiles, across
    batch boundaries and wrapping around; batches keep their tile layout and none is left out.
    Fault caught: swapping whole batches with the previous one only when their shapes match (the
    control then skipped every batch whose image count differed from its neighbour's)."""
    layout = [[(1, 1), (2, 2), (3, 1)], [(4, 1)], [(5, 2), (6, 1), (7, 1)]]
    batches = [_batch(images) for images in layout]
    swapped = eval_captions.swapped_pixels(batches, CTX, TOKENS_PER_TILE)
    got = [_pictures(p, [t for _, t in images]) for p, images in zip(swapped, layout, strict=True)]
    # one-tile pictures in order 1, 3, 4, 6, 7 each take the one before (1 takes 7); two-tile: 2 <-> 5
    assert got == [[7, 5, 1], [3], [2, 4, 6]]
    for mine, theirs in zip(batches, swapped, strict=True):
        assert theirs.shape == mine["pixel_values"].shape


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kw)


def test_min_margin_sets_the_exit_status(tmp_path):
    """A one-step checkpoint has not learnt to read pictures: with --min-margin 10 eval_captions prints
    the comparison and exits 1 naming the failure; with a bar it clears it exits 0; --min-margin
    without the swapped row is refused. Fault caught: the verdict printed but the exit status left 0
    (the quickstart would then pass with a model that ignores the pictures)."""
    raw = tmp_path / "raw"
    gen = [sys.executable, "tools/make_synthetic_data.py", "--output", str(raw), "--samples", "12"]
    assert _run(gen + ["--heldout", "6"]).returncode == 0
    prefix = tmp_path / "heldout"
    prep = [
        sys.executable,
        "tools/preprocess_data.py",
        "--input",
        str(raw / "heldout.jsonl"),
        "--tokenizer",
        str(raw / "tokenizer"),
        "--max-tiles",
        "1",
        "--max-seq-length",
        "512",
        "--output-prefix",
        str(prefix),
        "--no-progress",
    ]
    assert _run(prep).returncode == 0, "preprocess failed"
    ckpt = tmp_path / "ckpt"
    stage = f"{{name: s, trainable: [projector, language], sources: [{{prefix: {prefix}}}]}}"
    train = [
        sys.executable,
        "pretrain_vlm.py",
        "--config",
        "examples/configs/tiny.yaml",
        f"data.stages=[{stage}]",
        "train.iters=1",
        "data.seq_length=512",
        "data.global_batch_size=1",
        "data.num_workers=0",
        "data.max_tiles=1",
        "model.vision.num_layers=1",
        "model.language.num_layers=1",
        "model.vision.patch_size=28",
        "model.projector.downsample_ratio=1.0",
        f"checkpoint.save={ckpt}",
        f"logging.dir={tmp_path / 'logs'}",
    ]
    proc = _run(train)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluate = [
        sys.executable,
        "tools/eval_captions.py",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(prefix),
        "--samples",
        "6",
    ]
    failed = _run(evaluate + ["--min-margin", "10"])
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "(at least 10 needed)" in failed.stdout and "does not read the picture" in failed.stderr
    assert "| trained, images swapped |" in failed.stdout
    passed = _run(evaluate + ["--min-margin", "-101"])
    assert passed.returncode == 0, passed.stderr[-3000:]
    refused = _run(evaluate + ["--min-margin", "10", "--no-swap"])
    assert refused.returncode == 2 and "--min-margin" in refused.stderr
