"""Exact resume through pretrain(): a run cut in two by a save and a load logs the losses of an
uninterrupted one bit for bit, at TP=2, inside a stage and with the save in a stage's last step."""

from __future__ import annotations

import json

import pytest
from dist_utils import run_distributed_test
from train_utils import make_datasets, tiny_run_config, two_stages

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 6


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return make_datasets(str(tmp_path_factory.mktemp("resume_data")))


def _run(rank, world_size, prefixes, overrides, out):
    from megasail.training.loop import pretrain

    cfg = tiny_run_config(["parallel.tensor=2", "seed=21", "optim.warmup_steps=1", *overrides])
    cfg.data.stages = two_stages(prefixes, budget_samples=20)
    summary = pretrain(cfg)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(summary["losses"], f)


def _train(prefixes, overrides, out):
    run_distributed_test(_run, 2, prefixes, overrides, str(out))
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def uninterrupted(datasets, tmp_path_factory):
    """The 6-step TP=2 run, and the step whose batch ended the first stage (from its metrics)."""
    root = tmp_path_factory.mktemp("whole")
    losses = _train(datasets, [f"train.iters={STEPS}", f"logging.dir={root}"], root / "losses.json")
    stages = [json.loads(line)["stage"] for line in (root / "metrics.jsonl").read_text().splitlines()]
    last_align = stages.count("align")
    assert stages == ["align"] * last_align + ["advance"] * (STEPS - last_align)
    assert 2 <= last_align <= STEPS - 2, stages  # the boundary lies inside the run
    return losses, last_align


@pytest.mark.parametrize("where", ["stage_boundary", "mid_stage"])
def test_save_and_load_continue_bit_for_bit(datasets, uninterrupted, tmp_path, where):
    """Steps 1..k with a save, then a new process group loading it for steps k+1..6, log exactly the
    losses of the uninterrupted run: k is the first stage's last step (the save records the old
    stage's optimizer and schedule, the loader already points at the next stage) or one step later.

    Fails if the loader position, the optimizer or scheduler state, or the stage index are not
    restored (planted: loader.load_state_dict skipped -> the second half reads other samples)."""
    losses, last_align = uninterrupted
    k = last_align if where == "stage_boundary" else last_align + 1
    ckpt = tmp_path / "ckpt"
    first = _train(datasets, [f"train.iters={k}", f"checkpoint.save={ckpt}"], tmp_path / "a.json")
    second = _train(
        datasets,
        [f"train.iters={STEPS}", f"checkpoint.load={ckpt}", f"checkpoint.save={ckpt}"],
        tmp_path / "b.json",
    )
    assert first + second == losses
