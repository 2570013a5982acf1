"""Learning-rate schedules of curriculum stages: warmup counted in optimizer steps whatever the budget's
unit, a first step above lr 0, the decay on the stage's budget clock, a resumed schedule, and the lr a
real run logs for a stage with its own warmup and a stage decaying over its sample budget.

Expected learning rates are written out here from the schedule's definition (linear warmup, cosine
decay 0.5 (1 + cos(pi r)) from the peak to min_lr), never taken from the scheduler under test.
"""

from __future__ import annotations

import json
import math

import pytest
from dist_utils import run_distributed_test
from train_utils import TINY_YAML, make_datasets, tiny_run_config, two_stages

from megasail.config import load_config
from megasail.data.loader.config import SourceConfig, StageConfig

LR, MIN_LR = 1e-3, 1e-4


def _cosine(r: float, lr: float = LR, min_lr: float = MIN_LR) -> float:
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * r))


def _scheduler(overrides, **stage):
    from megasail.training.optim import build_scheduler, stage_clock

    cfg = load_config(TINY_YAML, [f"optim.lr={LR}", f"optim.min_lr={MIN_LR}", *overrides])
    stage = StageConfig(name="s", sources=[SourceConfig("x")], **stage)
    holder = type("Opt", (), {"param_groups": [{}]})()
    clock = stage_clock(cfg, stage, 0)
    return build_scheduler(cfg, holder, stage, clock), holder


def _lrs(scheduler, holder, units) -> list[float]:
    """The lr of each step that consumes units[i] of the clock (advance() before the update, as the loop)."""
    out = []
    for u in units:
        scheduler.advance(u)
        out.append(holder.param_groups[0]["lr"])
    return out


def test_warmup_counts_optimizer_steps_with_a_sample_budget():
    """optim.warmup_steps=3 on a 100-sample stage whose packed steps hold 7, 2, 11, 5, 25 samples: the first
    three steps run at lr/3, 2lr/3, lr; the cosine decay then starts at the clock where warmup ended (20
    samples) and reads the clock at the start of each step's data.

    Fails if the warmup is counted in sequences (warmup_steps x global_batch_size samples: 3 x 4 = 12, ended
    after two steps), or if the first step runs at lr 0 (megatron's init_lr)."""
    scheduler, holder = _scheduler(["optim.warmup_steps=3"], budget_samples=100)
    lrs = _lrs(scheduler, holder, [7, 2, 11, 5, 25])
    expected = [LR / 3, 2 * LR / 3, LR, _cosine(0.0), _cosine((25 - 20) / (100 - 20))]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_a_clock_warmup_starts_above_zero_and_the_budget_ends_at_min_lr():
    """optim.warmup_fraction=0.1 of a 1000-token stage (100 tokens) and steps of 40 tokens: 0.4 lr, 0.8 lr,
    then the peak (the step straddling the warmup's end), then the decay at each step's start; a step that
    would start where the budget is spent runs at min_lr.

    Fails if a step reads the warmup at the start of its data (the stage's first step at lr 0)."""
    scheduler, holder = _scheduler(["optim.warmup_steps=null", "optim.warmup_fraction=0.1"], budget_tokens=1000)
    lrs = _lrs(scheduler, holder, [40, 40, 40, 40, 840, 0])
    expected = [0.4 * LR, 0.8 * LR, LR, _cosine((120 - 100) / 900), _cosine((160 - 100) / 900), MIN_LR]
    assert lrs == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("saved_after", [1, 4])
def test_a_restored_scheduler_continues_the_same_learning_rates(saved_after):
    """State saved after step 1 (inside a 3-step warmup) or step 4 (decaying), loaded into a new scheduler
    built from the same config: the following steps get the uninterrupted run's learning rates.

    Fails if the optimizer-step count or where the step warmup ended on the clock is not restored (the
    warmup restarts, or the decay starts at clock 0)."""
    units = [7, 2, 11, 5, 25, 10]
    whole, holder = _scheduler(["optim.warmup_steps=3"], budget_samples=100)
    expected = _lrs(whole, holder, units)
    first, holder1 = _scheduler(["optim.warmup_steps=3"], budget_samples=100)
    _lrs(first, holder1, units[:saved_after])
    second, holder2 = _scheduler(["optim.warmup_steps=3"], budget_samples=100)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert _lrs(second, holder2, units[saved_after:]) == pytest.approx(expected[saved_after:], rel=1e-12)


# --- real runs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return make_datasets(str(tmp_path_factory.mktemp("schedule_data")))


def _two_stage_run(rank, world_size, prefixes, logdir):
    """Alignment to its end, then two advance steps; metrics.jsonl in logdir."""
    from megasail.runtime import init_process_group, initialize
    from megasail.training.checks import check_run
    from megasail.training.loop import Trainer

    cfg = tiny_run_config([f"optim.lr={LR}", f"optim.min_lr={MIN_LR}", "optim.warmup_steps=0",
                           f"logging.dir={logdir}"])
    stages = two_stages(prefixes, budget_samples=40)  # alignment over several steps, then advance
    stages[1].lr, stages[1].warmup_steps = 3e-3, 2
    cfg.data.stages = stages
    init_process_group()
    check_run(cfg, 1)
    initialize(1, 1, seed=cfg.seed)
    trainer = Trainer(cfg)
    advance_steps = 0
    while advance_steps < 2:
        advance_steps += trainer.train_step()["stage"] == "advance"
    trainer.metrics.close()


@pytest.mark.distributed
def test_logged_lr_follows_the_sample_budget_and_a_stages_own_warmup(datasets, tmp_path):
    """A real run: alignment (40-sample budget, no warmup, cosine from 1e-3 to 1e-4) logs at each step the
    cosine of the stage samples consumed before it over 40; the advance stage (its own warmup_steps=2 and
    lr 3e-3) logs 1.5e-3 then 3e-3.

    Fails if the stage's schedule is clocked by optimizer steps instead of its budget (the mid-stage lr
    differs), or if the stage's own warmup_steps is ignored (its first step logs 3e-3)."""
    run_distributed_test(_two_stage_run, 1, datasets, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    align = [r for r in rows if r["stage"] == "align"]
    advance = [r for r in rows if r["stage"] == "advance"]
    assert len(align) >= 3, "the alignment stage must span several steps for a mid-stage check"
    consumed = 0
    for row in align:
        assert row["lr"] == pytest.approx(_cosine(min(consumed / 40, 1.0)), rel=1e-6), row["step"]
        consumed += row["samples"]
    assert consumed == 40
    assert [r["lr"] for r in advance] == pytest.approx([1.5e-3, 3e-3], rel=1e-9)
