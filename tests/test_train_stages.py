"""Curriculum stages in one run: what each stage trains, its optimizer state and its own LR schedule."""

from __future__ import annotations

import json

import pytest
import torch
from dist_utils import run_distributed_test
from train_utils import make_datasets, tiny_run_config, two_stages

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return make_datasets(str(tmp_path_factory.mktemp("stage_data")))


def _weights(chunks, prefix):
    return {n: p.detach().clone() for c in chunks for n, p in c.named_parameters() if n.startswith(prefix)}


def _changed(before, after):
    return sorted(n for n in before if not torch.equal(before[n], after[n]))


def _optimizer_state_numel(optimizer) -> int:
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            total += state["exp_avg"].numel() if "exp_avg" in state else 0
    return total


def _numel(weights) -> int:
    return sum(t.numel() for t in weights.values())


def _stage_switch(rank, world_size, prefixes, out):
    from megasail.runtime import init_process_group, initialize
    from megasail.training.checks import check_run
    from megasail.training.loop import Trainer

    cfg = tiny_run_config(["optim.lr=1e-3", "optim.min_lr=1e-5", "optim.warmup_steps=0"])
    cfg.data.stages = two_stages(prefixes, budget_samples=1)  # alignment: exactly one global batch
    cfg.data.stages[1].lr = 3e-3  # the advance stage's own peak learning rate
    init_process_group()
    check_run(cfg, 1)
    initialize(1, 1, seed=cfg.seed)
    trainer = Trainer(cfg)
    chunks = trainer.chunks
    start = {p: _weights(chunks, p) for p in ("vision_model.", "projector.", "language_model.")}
    m1 = trainer.train_step()
    after1 = {p: _weights(chunks, p) for p in start}
    report = {
        "stage1": m1["stage"],
        "lr1": m1["lr"],
        "vision_changed_1": _changed(start["vision_model."], after1["vision_model."]),
        "language_changed_1": _changed(start["language_model."], after1["language_model."]),
        "projector_changed_1": len(_changed(start["projector."], after1["projector."])),
        "state_numel_1": _optimizer_state_numel(trainer.run_state.optimizer),
        "projector_numel": _numel(start["projector."]),
        "vision_numel": _numel(start["vision_model."]),
        "frozen_with_grad_buffer_1": sorted(
            n
            for c in chunks
            for n, p in c.named_parameters()
            if not n.startswith("projector.") and hasattr(p, "main_grad")
        ),
        # the stage's schedule clock has run out exactly with its budget (1 sample)
        "clock_after_stage_1": trainer.run_state.scheduler.num_steps,
        "clock_total_1": trainer.run_state.clock.total,
    }
    m2 = trainer.train_step()
    after2 = {p: _weights(chunks, p) for p in start}
    report.update(
        {
            "stage2": m2["stage"],
            "lr2": m2["lr"],
            "vision_changed_2": len(_changed(after1["vision_model."], after2["vision_model."])),
            "language_changed_2": _changed(after1["language_model."], after2["language_model."]),
            "state_numel_2": _optimizer_state_numel(trainer.run_state.optimizer),
            "language_with_grad_buffer_2": sorted(
                n
                for c in chunks
                for n, p in c.named_parameters()
                if n.startswith("language_model.") and hasattr(p, "main_grad")
            ),
        }
    )
    with open(out, "w") as f:
        json.dump(report, f)


def test_stage_switch_changes_what_trains_and_restarts_the_schedule(datasets, tmp_path):
    """After an alignment-stage step the ViT and LLM are bitwise unchanged and hold no gradient
    buffer or optimizer state (Adam state covers the projector only); the stage's LR reached min_lr
    with its budget. After the switch the ViT changes, the LLM still does not, the optimizer holds
    vision + projector state, and the advance stage starts at its own peak LR (no warmup: a step runs at
    the decay's value at the start of its data).

    Fails if freezing is skipped (ViT/LLM change in alignment), if the switch does not rebuild DDP
    and optimizer (the ViT stays unchanged in advance), or if the schedule ignores the budget."""
    out = tmp_path / "report.json"
    run_distributed_test(_stage_switch, 1, datasets, str(out))
    r = json.loads(out.read_text())
    assert r["stage1"] == "align" and r["stage2"] == "advance"
    assert r["vision_changed_1"] == [] and r["language_changed_1"] == []
    assert r["projector_changed_1"] > 0
    assert r["state_numel_1"] == r["projector_numel"]
    assert r["frozen_with_grad_buffer_1"] == []
    assert r["lr1"] == pytest.approx(1e-3) and r["clock_after_stage_1"] == r["clock_total_1"] == 1
    assert r["vision_changed_2"] > 0 and r["language_changed_2"] == []
    assert r["state_numel_2"] == r["projector_numel"] + r["vision_numel"]
    assert r["language_with_grad_buffer_2"] == []
    assert r["lr2"] == pytest.approx(3e-3)


def _init_checkpoint(rank, world_size, prefixes, root):
    from megasail.runtime import init_process_group, initialize
    from megasail.training.checks import check_run
    from megasail.training.loop import Trainer

    init_process_group()
    first = tiny_run_config([f"data.path={prefixes['a']}", f"checkpoint.save={root}/first", "seed=4"])
    check_run(first, 1)
    initialize(1, 1, seed=first.seed)
    trainer = Trainer(first)
    for _ in range(2):
        trainer.train_step()
    saved = trainer.save()
    trained = {n: p.detach().clone() for c in trainer.chunks for n, p in c.named_parameters()}
    second = tiny_run_config(["seed=5"])
    second.data.stages = two_stages(prefixes)
    second.data.stages[0].init_checkpoint = saved
    check_run(second, 1)
    initialize(1, 1, seed=second.seed)
    fresh = Trainer(second)
    loaded = {n: p.detach().clone() for c in fresh.chunks for n, p in c.named_parameters()}
    report = {
        "differs": sorted(n for n in trained if not torch.equal(trained[n], loaded[n])),
        "scheduler_steps": fresh.run_state.scheduler.num_steps,
        "optimizer_state": _optimizer_state_numel(fresh.run_state.optimizer),
        "step": fresh.step,
        "stage": fresh.run_state.stage.name,
    }
    # a weights-only checkpoint (as tools/convert_checkpoint.py writes) given as checkpoint.load: a fresh run
    from megasail.training import checkpoint

    checkpoint.save_checkpoint(f"{root}/weights", 0, trainer.run_state.model, meta={})
    third = tiny_run_config([f"data.path={prefixes['b']}", f"checkpoint.load={root}/weights", "seed=6"])
    check_run(third, 1)
    initialize(1, 1, seed=third.seed)
    started = Trainer(third)
    report["weights_only_differs"] = sorted(
        n for c in started.chunks for n, p in c.named_parameters() if not torch.equal(trained[n], p)
    )
    report["weights_only_step"] = started.train_step()["step"]
    with open(f"{root}/report.json", "w") as f:
        json.dump(report, f)


def test_a_stage_starts_from_another_runs_weights(datasets, tmp_path):
    """stage.init_checkpoint: the stage's model is the other run's saved weights, bit for bit, with a
    fresh optimizer (no Adam state), its schedule at zero and the step count of this run. A weights-only
    checkpoint as checkpoint.load starts a fresh run from its weights.

    Fails if init_checkpoint is ignored (the model keeps this run's own seed-5 initial weights)."""
    run_distributed_test(_init_checkpoint, 1, datasets, str(tmp_path))
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["differs"] == [] and r["stage"] == "align"
    assert r["scheduler_steps"] == 0 and r["optimizer_state"] == 0 and r["step"] == 0
    assert r["weights_only_differs"] == [] and r["weights_only_step"] == 1


def _three_stages(rank, world_size, prefixes, overlap, out):
    """Alignment, advance and SFT (each one or two global batches) with parallel.overlap_grad_reduce as
    given: per-step losses, the final weights, and whether each stage's DDP and optimizer outlived it."""
    import gc
    import weakref

    from megasail.data.loader.config import SourceConfig, StageConfig
    from megasail.runtime import init_process_group, initialize
    from megasail.training.checks import check_run
    from megasail.training.loop import Trainer

    cfg = tiny_run_config(["optim.lr=1e-3", f"parallel.overlap_grad_reduce={str(overlap).lower()}"])
    stages = two_stages(prefixes, budget_samples=6)
    stages[1].budget_samples = 6
    stages.append(StageConfig(name="sft", sources=[SourceConfig(prefixes["a"])], budget_samples=6,
                              trainable=["vision", "projector", "language"]))
    cfg.data.stages = stages
    init_process_group()
    check_run(cfg, 1)
    initialize(1, 1, seed=cfg.seed)
    trainer = Trainer(cfg)
    losses, stages_seen, survivors = [], [], []
    watched = None
    while (metrics := trainer.train_step()) is not None:
        losses.append(metrics["loss"])
        stages_seen.append(metrics["stage"])
        if watched is not None and metrics["stage"] != watched[0]:
            gc.collect()
            survivors.append([watched[0], [ref() is not None for ref in watched[1]]])
        state = trainer.run_state
        watched = (state.stage.name, [weakref.ref(m) for m in state.model] + [weakref.ref(state.optimizer)])
    weights = {n: p.detach().clone() for c in trainer.chunks for n, p in c.named_parameters()}
    torch.save({"losses": losses, "stages": stages_seen, "survivors": survivors, "weights": weights}, out)


def test_stage_switches_with_overlapped_grad_reduce_train_as_without_it(datasets, tmp_path):
    """Three stages (projector; vision + projector; all) with parallel.overlap_grad_reduce on and off: the same
    loss at every step and the same final weights, and after each switch the previous stage's DDP and
    optimizer are gone (their weak references are dead).

    Fails if a switch leaves the old DDP alive (its gradient hooks still fire after the new DDP's: with the
    overlap on, the next stage's first backward stops with 'param.grad being None is not safe'; with it off,
    the old DDP and its gradient buffers survive every switch)."""
    runs = {}
    for overlap in (False, True):
        out = tmp_path / f"overlap_{overlap}.pt"
        run_distributed_test(_three_stages, 1, datasets, overlap, str(out))
        runs[overlap] = torch.load(out, weights_only=False)
    off, on = runs[False], runs[True]
    assert on["stages"] == off["stages"] and {"align", "advance", "sft"} <= set(on["stages"])
    assert on["losses"] == pytest.approx(off["losses"], rel=1e-5)
    for name, weight in off["weights"].items():
        torch.testing.assert_close(on["weights"][name], weight, rtol=1e-5, atol=1e-7, msg=name)
    for run in (off, on):
        assert [s for s, _ in run["survivors"]] == ["align", "advance"]
        assert all(not any(alive) for _, alive in run["survivors"]), run["survivors"]
