"""The start-up memory check (checks.check_memory): a run whose estimated memory per rank exceeds what
the device has stops before the model is built, with both numbers and what to change."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest
from train_utils import REPO, TINY_YAML

from megasail.config import load_config
from megasail.training import memory_budget
from megasail.training.checks import StartupError, check_run

GIB = 2**30


def _dataset(tmp_path) -> str:
    prefix = tmp_path / "ds"
    with open(f"{prefix}.manifest.json", "w") as f:
        json.dump(
            {
                "format_version": 1,
                "image_token_ids": {"img_context": 405},
                "tokenizer": {"vocab_size": 410, "special_token_ids": {"<|im_end|>": 401}},
            },
            f,
        )
    return str(prefix)


def _budget(monkeypatch, gib: float):
    monkeypatch.setattr(memory_budget, "device_budget", lambda world_size: (gib * GIB, "the test's budget"))


def test_a_run_that_cannot_fit_stops_with_both_numbers(tmp_path, monkeypatch):
    """The tiny config at 4096-token sequences needs about 2.1 GiB per rank (unfused attention keeps a
    4 x 4096^2 fp32 softmax per layer): refused under a 1 GiB budget, with the estimate, the budget, the
    stage, the layout and the fixes in the message; started under 4 GiB, or with train.memory_check=false.

    Fault caught: check_memory not called from check_run, the comparison turned around, the switch ignored."""
    prefix = _dataset(tmp_path)
    overrides = [f"data.path={prefix}", "data.seq_length=4096", "data.global_batch_size=2"]
    _budget(monkeypatch, 1.0)
    with pytest.raises(StartupError) as refused:
        check_run(load_config(TINY_YAML, overrides), 2)
    message = str(refused.value)
    need = float(message.split("needs about ")[1].split(" GiB")[0])
    assert 1.0 < need < 4.0, message
    assert "but has 1.00 GiB (the test's budget)" in message
    assert "stage 'main', pipeline rank 0 of 1" in message and "4096 tokens" in message
    assert "raise parallel.tensor or parallel.pipeline" in message and "train.recompute=selective" in message
    assert "train.memory_check=false" in message
    check_run(load_config(TINY_YAML, overrides + ["train.memory_check=false"]), 2)
    _budget(monkeypatch, 4.0)
    check_run(load_config(TINY_YAML, overrides), 2)


def test_the_largest_curriculum_stage_decides(tmp_path, monkeypatch):
    """Memory depends on what a stage trains (frozen parts hold no gradients or optimizer state): a run
    whose projector-only stage fits is still refused when its later full stage does not, and the message
    names that stage.

    Fault caught: only the first stage checked."""
    prefix = _dataset(tmp_path)
    align = f"{{name: align, sources: [{{prefix: {prefix}}}], trainable: [projector], budget_samples: 8}}"
    full = f"{{name: full, sources: [{{prefix: {prefix}}}], trainable: [vision, projector, language]}}"
    sizes = ["data.seq_length=4096", "data.global_batch_size=2", "model.language.vocab_size=65536"]
    cfg = load_config(TINY_YAML, [f"data.stages=[{align}, {full}]", *sizes])
    align_only = load_config(TINY_YAML, [f"data.stages=[{align}]", *sizes])
    need_full, _, _ = memory_budget.run_estimate(check_run_copy(cfg), 1)
    need_align, _, _ = memory_budget.run_estimate(check_run_copy(align_only), 1)
    assert need_align.total < need_full.total
    _budget(monkeypatch, (need_align.total + need_full.total) / 2 / GIB)
    check_run(align_only, 1)
    with pytest.raises(StartupError, match="stage 'full'"):
        check_run(cfg, 1)


def check_run_copy(cfg):
    """cfg after the other start-up checks (manifest values adopted), memory check off."""
    import copy

    out = copy.deepcopy(cfg)
    out.train.memory_check = False
    check_run(out, 1)
    return out


def test_cpu_budget_is_available_ram_shared_by_the_local_ranks(monkeypatch):
    """On a CPU each of the node's ranks gets the available host RAM divided by LOCAL_WORLD_SIZE (the
    world size when torchrun did not set it).

    Fault caught: the whole RAM given to every rank."""
    monkeypatch.setattr(memory_budget.torch.cuda, "is_available", lambda: False)  # the CPU path on any machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    budget, source = memory_budget.device_budget(8)
    assert budget == pytest.approx(psutil.virtual_memory().available / 4, rel=0.05)
    assert "shared by 4 local ranks" in source
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert memory_budget.device_budget(2)[0] == pytest.approx(psutil.virtual_memory().available / 2, rel=0.05)


def test_sail_vl_2b_on_a_cpu_box_stops_at_start_up(tmp_path):
    """pretrain_vlm.py --config examples/configs/sail_vl_2b.yaml on a CPU machine: exit status 2 before
    the model is built, naming the estimate and the host RAM (instead of an OOM kill after minutes).

    Fault caught: the check missing from pretrain()'s start-up path."""
    # the CPU path everywhere (CUDA hidden); a host with > 200 GiB could hold the 2B run, so there a
    # 2B model stopping would be wrong and the test has nothing to show
    if psutil.virtual_memory().total > 200 * GIB:
        pytest.skip("the 2B config fits this host's RAM: nothing to refuse")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    proc = subprocess.run(
        [
            sys.executable,
            "pretrain_vlm.py",
            "--config",
            "examples/configs/sail_vl_2b.yaml",
            f"data.path={_dataset(tmp_path)}",
            "logging.wandb=false",
        ],
        cwd=REPO,
        env=env | {"PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the run needs about" in proc.stderr and "available host RAM" in proc.stderr, proc.stderr[-3000:]
