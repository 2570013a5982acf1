"""Validation loss (train.eval_interval / train.eval_iters over a stage's validation_sources): logged every
interval and at the stage's end, equal to the loss of the weights at that step on the validation batches,
the same at DP=1 and DP=2, and without effect on training."""

from __future__ import annotations

import json

import pytest
import torch
from dist_utils import run_distributed_test
from train_utils import make_datasets, tiny_run_config

from megasail.data.loader.config import SourceConfig, StageConfig

pytestmark = [pytest.mark.distributed]

STEPS = 4


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return make_datasets(str(tmp_path_factory.mktemp("validation_data")))


def _config(prefixes, root, name, evaluate: bool):
    overrides = [f"train.iters={STEPS}", f"logging.dir={root}/{name}", "seed=9"]
    if evaluate:
        overrides += ["train.eval_interval=2", "train.eval_iters=2", f"checkpoint.save={root}/{name}/ckpt",
                      "checkpoint.interval=2", "checkpoint.keep_last=4"]
    cfg = tiny_run_config(overrides)
    cfg.data.stages = [StageConfig(name="main", sources=[SourceConfig(prefixes["a"])], budget_samples=10_000,
                                   trainable=["vision", "projector", "language"],
                                   validation_sources=[SourceConfig(prefixes["b"])])]
    return cfg


def _runs(rank, world_size, prefixes, root, names):
    from megasail.training.loop import pretrain

    for name, evaluate in names:
        pretrain(_config(prefixes, root, name, evaluate))


def _direct_loss(rank, world_size, prefixes, root, out):
    """The validation batches' token-weighted loss of the step-4 weights, by a plain forward of the model (no
    pipeline schedule, no DDP, no all-reduce)."""
    from megasail.checkpoint import load_checkpoint
    from megasail.data.loader.validation import build_validation_loader
    from megasail.runtime import init_process_group, initialize
    from megasail.training.checks import check_run
    from megasail.training.costs import cost_model
    from megasail.training.model_builder import build_model_chunks
    from megasail.training.step import packed_attention

    cfg = _config(prefixes, root, "dp1", evaluate=True)
    init_process_group()
    check_run(cfg, 1)
    initialize(1, 1, seed=cfg.seed)
    model = build_model_chunks(cfg.model, cfg.parallel)[0].eval()
    load_checkpoint(f"{root}/dp1/ckpt/iter_{STEPS:07d}", [model], weights_only=True)
    val = build_validation_loader(cfg.data, 0, cfg.train.eval_iters, cost_model=cost_model(cfg.model))
    total, tokens = 0.0, 0.0
    with torch.no_grad():
        for batches in val:
            for b in batches:
                b, _ = packed_attention(b, model)  # the block-causal mask from the batch's cu_seqlens
                losses = model(input_ids=b["input_ids"], position_ids=b["position_ids"],
                               pixel_values=b.get("pixel_values"), attention_mask=b.get("attention_mask"),
                               labels=b["labels"])
                mask = b["loss_mask"].float()
                total += float((losses.float() * mask).sum())
                tokens += float(mask.sum())
    val.close()
    with open(out, "w") as f:
        json.dump({"loss": total / tokens, "tokens": tokens}, f)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_validation_loss_is_the_loss_of_the_weights_on_held_out_data(datasets, tmp_path):
    """Four steps with train.eval_interval=2 over prefix 'b' held out: steps 2 and 4 log val_loss (and only
    they); step 4's equals a plain forward of the step-4 checkpoint over the validation batches; DP=2 logs
    the DP=1 values; a run without evaluation logs the same training losses.

    Fails if evaluation runs on the wrong weights or data (the plain forward differs), if the validation loss
    is one rank's share (DP=2 differs), or if evaluating disturbs training (its RNG, loader position or
    gradient buffers: the training losses differ from the run without it)."""
    root = str(tmp_path)
    run_distributed_test(_runs, 1, datasets, root, [("dp1", True), ("plain", False)])
    run_distributed_test(_runs, 2, datasets, root, [("dp2", True)])
    run_distributed_test(_direct_loss, 1, datasets, root, str(tmp_path / "direct.json"))
    dp1, plain, dp2 = (_rows(tmp_path / n / "metrics.jsonl") for n in ("dp1", "plain", "dp2"))
    assert [r["step"] for r in dp1 if "val_loss" in r] == [2, 4]
    assert [r["loss"] for r in dp1] == pytest.approx([r["loss"] for r in plain], rel=1e-6)
    direct = json.loads((tmp_path / "direct.json").read_text())
    assert dp1[3]["val_loss"] == pytest.approx(direct["loss"], rel=1e-5)
    assert dp1[3]["val_loss_tokens"] == direct["tokens"] > 0
    assert [r["step"] for r in dp2 if "val_loss" in r] == [2, 4]
    assert [r["val_loss"] for r in dp2 if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in dp1 if "val_loss" in r], rel=1e-4)
    assert dp1[1]["val_loss"] != dp1[3]["val_loss"]  # the weights changed in between
