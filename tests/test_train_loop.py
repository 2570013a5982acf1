"""pretrain() end to end on the real loader: the same losses at TP=1, TP=2 and PP=2 from one seed,
every metrics key each step, non-finite steps skipped and counted, a run stopped after too many."""

from __future__ import annotations

import json
import math

import pytest
import torch
from dist_utils import run_distributed_test
from train_utils import make_datasets, tiny_run_config

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return make_datasets(str(tmp_path_factory.mktemp("train_data")))


def _nan_forward(inject: tuple[int, ...], per_step: int):
    """forward_step whose loss is NaN on the listed (1-based) optimizer steps."""
    from megasail.training import step as step_module

    calls = {"n": 0}

    def forward(data_iterator, model):
        losses, loss_func = step_module.forward_step(data_iterator, model)
        calls["n"] += 1
        step = (calls["n"] - 1) // per_step + 1
        return (losses * float("nan") if step in inject else losses), loss_func

    return forward


def _runs(rank, world_size, runs, out):
    """Several pretrain() runs one after the other in this process group: [(overrides, inject), ...]."""
    from megasail.training import step as step_module
    from megasail.training.loop import TrainingDiverged, pretrain

    results = []
    for overrides, inject in runs:
        forward = _nan_forward(tuple(inject), per_step=4) if inject else step_module.forward_step
        try:
            summary = pretrain(tiny_run_config(overrides), forward_step_func=forward)
            results.append({"losses": summary["losses"], "skipped": summary["skipped_steps"]})
        except TrainingDiverged as e:
            results.append({"diverged": str(e)})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def train(world, runs, out):
    """Results of ``runs`` ([(overrides, inject steps)]) in one group of ``world`` processes."""
    run_distributed_test(_runs, world, [(list(o), list(i)) for o, i in runs], str(out))
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def layouts(datasets, tmp_path_factory):
    """Runs from seed 11 on prefix 'a': TP=1 (3 steps, logging metrics) and DP=1 (2 steps, seed 5) in
    one process; TP=2, PP=2 and DP=2 in a group of two."""
    root = tmp_path_factory.mktemp("layouts")
    three = ["train.iters=3", f"data.path={datasets['a']}", "seed=11"]
    two = ["train.iters=2", f"data.path={datasets['a']}", "seed=5"]
    one = train(1, [(three + [f"logging.dir={root}"], []), (two, [])], root / "one.json")
    pair = train(
        2,
        [(three + ["parallel.tensor=2"], []), (three + ["parallel.pipeline=2"], []), (two, []),
         (three + ["parallel.pipeline=2", "parallel.overlap_grad_reduce=true"], [])],
        root / "two.json",
    )
    return {"tp1": one[0], "dp1": one[1], "tp2": pair[0], "pp2": pair[1], "dp2": pair[2],
            "pp2_overlap": pair[3], "logdir": root}


def test_tp_and_pp_layouts_log_the_same_losses(layouts):
    """TP=1, TP=2 and PP=2 (also with overlapped grad reduce, whose 1F1B schedule starts the reduce through
    grad_sync_func) from one seed: the same three losses (rtol 1e-4), on the real loader.

    Fails if the initial weights depend on the layout (init_weights skipped: TP=2 differs at step 1),
    or if the logged loss is one rank's share instead of the token-weighted global mean."""
    reference = layouts["tp1"]["losses"]
    assert len(reference) == 3 and all(math.isfinite(x) for x in reference)
    assert reference[2] < reference[0]  # it trains
    for name in ("tp2", "pp2", "pp2_overlap"):
        torch.testing.assert_close(layouts[name]["losses"], reference, rtol=1e-4, atol=0, msg=name)


def test_data_parallel_loss_is_the_token_weighted_mean_over_ranks(layouts):
    """DP=2 logs the loss of the whole global batch: equal to the DP=1 run's (same samples).

    Fails if only rank 0's micro-batches enter the logged loss."""
    torch.testing.assert_close(layouts["dp2"]["losses"], layouts["dp1"]["losses"], rtol=1e-4, atol=0)


def test_metrics_file_has_every_key_each_step(layouts):
    """metrics.jsonl: one object per step with the documented keys and the loader statistics.

    Fails if a key is dropped or a step is not written."""
    from megasail.training.metrics import REQUIRED_KEYS

    lines = [json.loads(x) for x in (layouts["logdir"] / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    for m in lines:
        missing = [k for k in REQUIRED_KEYS if k not in m]
        assert not missing, missing
        assert m["tokens"] > 0 and m["tokens_per_s"] > 0 and m["tflops_per_device"] > 0
        assert m["step_time_spread"] >= 1.0 and m["mem_gb"] > 0 and m["skipped_samples"] == 0
        assert {"padding_fraction", "samples", "dp_imbalance_max"} <= set(m["loader"])
        assert m["stage"] == "main" and m["lr"] > 0 and math.isfinite(m["grad_norm"])
    assert [m["loss"] for m in lines] == layouts["tp1"]["losses"]


def test_nan_loss_is_skipped_counted_and_stops_the_run_when_repeated(datasets, tmp_path):
    """A NaN loss at step 2 skips that update and is counted; the run goes on and still trains.
    NaN from step 2 on stops after train.max_nan_steps in a row, naming the checkpoint to go back to.

    Fails if the skip check is removed (the NaN reaches the weights: every later loss is NaN) or the
    streak limit is not enforced (the run ends normally)."""
    common = [f"data.path={datasets['a']}", "seed=3"]
    ckpt = tmp_path / "ckpt"
    stop = ["train.iters=8", "train.max_nan_steps=2", f"checkpoint.save={ckpt}", "checkpoint.interval=1"]
    once, stopped = train(
        1, [(common + ["train.iters=4"], [2]), (common + stop, [2, 3, 4, 5, 6, 7, 8])], tmp_path / "nan.json"
    )
    losses = once["losses"]
    assert math.isnan(losses[1]) and once["skipped"] == 1
    assert all(math.isfinite(x) for x in (losses[0], losses[2], losses[3]))
    assert "2 consecutive steps" in stopped["diverged"]
    assert f"go back to {ckpt}/iter_000000" in stopped["diverged"]
