"""Activation recomputation (train.recompute): the same losses, with megatron's checkpointing engaged."""

from __future__ import annotations

import json

import pytest
from dist_utils import run_distributed_test
from train_utils import make_datasets, tiny_run_config

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return make_datasets(str(tmp_path_factory.mktemp("recompute_data")))["a"]


def _modes(rank, world_size, prefix, out):
    from megatron.core import tensor_parallel

    from megasail.runtime import init_process_group, initialize
    from megasail.training.checks import check_run
    from megasail.training.loop import Trainer

    original = tensor_parallel.checkpoint
    calls = {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    tensor_parallel.checkpoint = counting  # megatron's blocks look it up at call time
    init_process_group()
    report = {}
    for mode in ("none", "selective", "full"):
        cfg = tiny_run_config([f"data.path={prefix}", f"train.recompute={mode}", "seed=9"])
        check_run(cfg, 1)
        initialize(1, 1, seed=cfg.seed)
        trainer = Trainer(cfg)
        calls["n"] = 0
        losses = [trainer.train_step()["loss"] for _ in range(2)]
        report[mode] = {"losses": losses, "checkpoint_calls": calls["n"]}
    with open(out, "w") as f:
        json.dump(report, f)


def test_recompute_modes_give_the_same_losses(prefix, tmp_path):
    """selective (core attention) and full (whole layers) recompute call megatron's checkpoint and
    train exactly like no recompute.

    Fails if apply_recompute is a no-op (no checkpoint calls) or recomputation changes the numbers."""
    out = tmp_path / "report.json"
    run_distributed_test(_modes, 1, prefix, str(out))
    r = json.loads(out.read_text())
    assert r["none"]["checkpoint_calls"] == 0
    assert r["selective"]["checkpoint_calls"] > 0 and r["full"]["checkpoint_calls"] > 0
    assert r["selective"]["losses"] == r["none"]["losses"] == r["full"]["losses"]
