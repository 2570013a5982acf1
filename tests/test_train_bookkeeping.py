"""Run bookkeeping across restarts: a resumed run without budget keeps (or re-plans) its schedule and says
so; a run never takes over the checkpoint directory of a later run; SIGTERM saves once and exits 0;
an update whose gradient is not finite leaves every weight as it was."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from dist_utils import run_distributed_test
from train_utils import REPO, make_datasets, tiny_run_config

pytestmark = [pytest.mark.distributed]

LR, MIN_LR = 1e-3, 1e-4  # tiny.yaml's


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return make_datasets(str(tmp_path_factory.mktemp("bookkeeping_data")))


def _rows(logdir) -> list[dict]:
    with open(os.path.join(logdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _restarts(rank, world_size, prefix, root, out):
    """Five runs one after the other, as a user would start them; stdout and errors of each kept."""
    from megasail.training.checks import StartupError
    from megasail.training.loop import pretrain

    ckpt = f"{root}/ckpt"
    runs = {
        "first": ["train.iters=2", f"checkpoint.save={ckpt}", f"logging.dir={root}/logs"],
        "longer": ["train.iters=4", f"checkpoint.load={ckpt}", f"checkpoint.save={ckpt}", f"logging.dir={root}/logs"],
        "replanned": ["train.iters=4", f"checkpoint.load={ckpt}/iter_0000002", f"checkpoint.save={root}/ckpt3",
                      "optim.override_scheduler=true", f"logging.dir={root}/logs3"],
        "fresh_into_used_dir": ["train.iters=1", f"checkpoint.save={ckpt}"],
        "fresh_overwrite": ["train.iters=1", f"checkpoint.save={ckpt}", "checkpoint.overwrite=true"],
    }
    report = {}
    for name, overrides in runs.items():
        cfg = tiny_run_config([f"data.path={prefix}", "optim.warmup_steps=0", "seed=3", *overrides])
        out_text = io.StringIO()
        with contextlib.redirect_stdout(out_text):
            try:
                pretrain(cfg)
                error = None
            except StartupError as e:
                error = str(e)
        with open(f"{ckpt}/latest_checkpointed_iteration.txt") as f:
            marker = f.read().strip()
        report[name] = {"stdout": out_text.getvalue(), "error": error, "marker": marker}
    report["superseded"] = sorted(
        f"{d}/{n}" for d in os.listdir(ckpt) if d.startswith("superseded_") for n in os.listdir(f"{ckpt}/{d}")
    )
    with open(out, "w") as f:
        json.dump(report, f)


@pytest.fixture(scope="module")
def restarts(datasets, tmp_path_factory):
    root = tmp_path_factory.mktemp("restarts")
    run_distributed_test(_restarts, 1, datasets["a"], str(root), str(root / "report.json"))
    return root, json.loads((root / "report.json").read_text())


def test_a_longer_run_on_resume_keeps_its_schedule_and_says_so(restarts):
    """2 steps planned (train.iters=2, no budget), resumed with train.iters=4: steps 3-4 run at min_lr as
    planned (steps 1-2 at lr and the cosine's middle) and start-up says so, naming
    optim.override_scheduler; with that key the decay is re-planned
    over 4 steps (step 3 runs at the cosine's middle, (lr + min_lr) / 2).

    Fails if the note is missing, or if override_scheduler does not re-plan (step 3 at min_lr)."""
    root, report = restarts
    assert "keeps that plan" in report["longer"]["stdout"]
    assert "optim.override_scheduler=true" in report["longer"]["stdout"]
    half = (LR + MIN_LR) / 2  # the cosine's middle: a step starting at half the planned clock
    assert [r["lr"] for r in _rows(root / "logs")] == pytest.approx([LR, half, MIN_LR, MIN_LR], rel=1e-9)
    assert "re-planned" in report["replanned"]["stdout"]
    step3 = _rows(root / "logs3")[0]
    assert step3["step"] == 3 and step3["lr"] == pytest.approx((LR + MIN_LR) / 2, rel=1e-9)


def test_a_fresh_run_does_not_take_over_a_later_runs_checkpoints(restarts):
    """A fresh run (no checkpoint.load) saving into a directory that holds step 4: it stops at start-up naming
    the step and both ways on (resume with checkpoint.load, or checkpoint.overwrite), and the marker stays
    at 4. With checkpoint.overwrite=true the earlier steps move to superseded_*/ and the run's own step 1
    becomes the latest.

    Fails if the guard is removed (the fresh run saves iter_0000001 and moves the marker back to 1)."""
    root, report = restarts
    refused = report["fresh_into_used_dir"]
    assert refused["error"] is not None and "holds step 4" in refused["error"]
    assert f"checkpoint.load={root}/ckpt" in refused["error"] and "checkpoint.overwrite=true" in refused["error"]
    assert refused["marker"] == "4"
    assert report["fresh_overwrite"]["error"] is None and report["fresh_overwrite"]["marker"] == "1"
    assert any(p.endswith("/iter_0000004") for p in report["superseded"])
    assert any(p.endswith("/latest_checkpointed_iteration.txt") for p in report["superseded"])


def _poisoned_gradient(rank, world_size, prefix, out):
    """One step whose loss is finite but one parameter's gradient is NaN: the weights after it."""
    from megasail.runtime import init_process_group, initialize
    from megasail.training.checks import check_run
    from megasail.training.loop import Trainer

    cfg = tiny_run_config([f"data.path={prefix}", "seed=2"])
    init_process_group()
    check_run(cfg, 1)
    initialize(1, 1, seed=cfg.seed)
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for c in trainer.chunks for n, p in c.named_parameters()}
    weight = trainer.chunks[0].projector.linear_fc1.weight if hasattr(trainer.chunks[0].projector, "linear_fc1") \
        else next(trainer.chunks[0].projector.parameters())
    handle = weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    metrics = trainer.train_step()
    handle.remove()
    after = {n: p.detach().clone() for c in trainer.chunks for n, p in c.named_parameters()}
    torch.save({"metrics": metrics, "changed": sorted(n for n in before if not torch.equal(before[n], after[n]))}, out)


def test_a_non_finite_gradient_with_a_finite_loss_changes_no_weight(datasets, tmp_path):
    """One projector weight's gradient poisoned to NaN while the loss stays finite: the update is skipped and
    counted, and every weight of the model is bit-identical after the step.

    Fails if the gradient-norm guard is removed (the NaN norm passes the clip into every weight)."""
    out = tmp_path / "poisoned.pt"
    run_distributed_test(_poisoned_gradient, 1, datasets["a"], str(out))
    result = torch.load(out, weights_only=False)
    m = result["metrics"]
    assert math.isfinite(m["loss"]) and not m["updated"] and math.isnan(m["grad_norm"])
    assert m["skipped_steps"] == 1 and result["changed"] == []


def test_sigterm_saves_once_and_exits_zero(datasets, tmp_path):
    """SIGTERM to the whole process group (as Slurm's --signal reaches every process of the job) during a
    50-step run with two loader workers, after a periodic save: exit 0 after the current step, one more
    checkpoint at that step, metrics up to it.

    Fails if SIGTERM is not handled (the process dies with -15 and nothing is saved), or if the loader
    workers or megatron's checkpoint writer die of it (the next batch or the last save fails)."""
    logdir, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    cmd = [sys.executable, "pretrain_vlm.py", "--config", "examples/configs/tiny.yaml", f"data.path={datasets['a']}",
           "train.iters=50", f"logging.dir={logdir}", f"checkpoint.save={ckpt}", "checkpoint.interval=1",
           "checkpoint.keep_last=1", "data.seq_length=512", "data.num_workers=2", "data.max_tiles=1",
           "model.vision.num_layers=1", "model.language.num_layers=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = logdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    steps = [r["step"] for r in _rows(logdir)]
    assert 2 <= steps[-1] < 50 and steps == list(range(1, steps[-1] + 1))
    assert "SIGTERM: stopping after step" in stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(steps[-1])
    assert sorted(n for n in os.listdir(ckpt) if n.startswith("iter_")) == [f"iter_{steps[-1]:07d}"]
    assert stdout.count(f"saved {ckpt}/iter_{steps[-1]:07d}") == 1  # saved once


def test_kill9_during_a_save_then_resume_keeps_one_row_per_step_and_the_losses(datasets, tmp_path):
    """pretrain_vlm.py with two loader workers, saving every 2 steps, killed with SIGKILL while step 4's
    directory is still .tmp; the same command resumes from step 2. metrics.jsonl then has exactly one row
    per step 1-6 (steps 3-4 of the killed run set aside in metrics.jsonl.stale), every process the trainer
    started died with it, and the losses equal an uninterrupted run's.

    Fails if resumed rows are appended after the killed run's (steps 3-4 twice), if a loader worker or
    megatron's checkpoint writer outlives the trainer, or if the resumed run trains on other data or weights."""
    from process_utils import assert_all_die, descendants

    from megasail.training.checkpoint import PAUSE_ENV

    def command(name):
        return [sys.executable, "pretrain_vlm.py", "--config", "examples/configs/tiny.yaml",
                f"data.path={datasets['a']}", "train.iters=6", "seed=4", f"logging.dir={tmp_path / name}",
                f"checkpoint.save={tmp_path / name / 'ckpt'}", f"checkpoint.load={tmp_path / name / 'ckpt'}",
                "checkpoint.interval=2", "data.seq_length=512", "data.num_workers=2", "data.max_tiles=1",
                "model.vision.num_layers=1", "model.language.num_layers=2"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    whole = subprocess.run(command("whole"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc = subprocess.Popen(command("killed"), cwd=REPO, env={**env, PAUSE_ENV: "3"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    tmp4 = tmp_path / "killed" / "ckpt" / "iter_0000004.tmp" / "metadata.json"
    deadline = time.time() + 400
    try:
        while not tmp4.exists():  # shards written, publishing paused: the step dir is still .tmp
            assert proc.poll() is None and time.time() < deadline, "step 4 was never being saved"
            time.sleep(0.1)
        started = descendants(proc.pid)
        assert len(started) >= 2, "expected the loader workers among the trainer's processes"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert_all_die(started, 10.0, "processes the killed trainer started")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    resumed = subprocess.run(command("killed"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _rows(tmp_path / "killed")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    stale = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl.stale").read_text().splitlines()]
    assert stale == [3, 4]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in _rows(tmp_path / "whole")], rel=1e-6)
