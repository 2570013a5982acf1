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


def _runs(rank, world_size, prefixes, root):
    """In one group of two processes: the uninterrupted 6-step TP=2 run, then for k = the first
    stage's last step (from the run's metrics) and k + 1: steps 1..k with a save, and a second
    pretrain() that loads it and runs to step 6."""
    from megasail.training.loop import pretrain

    def run(*overrides):
        cfg = tiny_run_config(["parallel.tensor=2", "seed=21", "optim.warmup_steps=1", *overrides])
        cfg.data.stages = two_stages(prefixes, budget_samples=20)
        return pretrain(cfg)["losses"]

    report = {"whole": run(f"train.iters={STEPS}", f"logging.dir={root}")}
    with open(f"{root}/metrics.jsonl") as f:
        report["stages"] = [json.loads(line)["stage"] for line in f]
    k = report["stages"].count("align")
    for name, split in (("stage_boundary", k), ("mid_stage", k + 1)):
        ckpt = f"{root}/{name}"
        first = run(f"train.iters={split}", f"checkpoint.save={ckpt}")
        second = run(f"train.iters={STEPS}", f"checkpoint.load={ckpt}", f"checkpoint.save={ckpt}")
        report[name] = first + second
    if rank == 0:
        with open(f"{root}/report.json", "w") as f:
            json.dump(report, f)


def test_save_and_load_continue_bit_for_bit(datasets, tmp_path):
    """Steps 1..k with a save, then a pretrain() loading it for steps k+1..6, log exactly the losses of
    the uninterrupted run, for k the first stage's last step (the save holds the old stage's optimizer
    and schedule while the loader already points at the next stage) and for k one step into the next
    stage (the Adam state and the LR clock of a stage in progress).

    Fails if the loader position, the optimizer or scheduler state, or the stage index are not
    restored (planted: loader.load_state_dict skipped -> the second half reads other samples)."""
    run_distributed_test(_runs, 2, datasets, str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    k = report["stages"].count("align")
    assert report["stages"] == ["align"] * k + ["advance"] * (STEPS - k)
    assert 2 <= k <= STEPS - 2, report["stages"]  # the boundary lies inside the run
    assert report["stage_boundary"] == report["whole"]
    assert report["mid_stage"] == report["whole"]
