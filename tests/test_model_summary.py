"""tools/model_summary.py runs on the tiny and 2B configs, its JSON adds up, and the memory model's
parameter counts per pipeline stage (megasail.models.memory) equal the built model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _summary(repo_root, *args):
    rendezvous = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}  # set by earlier in-process tests
    env = {k: v for k, v in os.environ.items() if k not in rendezvous} | {"PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "tools/model_summary.py", *args, "--json"], cwd=repo_root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tiny_yaml(repo_root):
    path = os.path.join(repo_root, "examples/configs/tiny.yaml")
    summary = _summary(repo_root, "--config", path if os.path.exists(path) else "tiny")
    assert summary["total"] == summary["vision"] + summary["projector"] + summary["language"]
    assert summary["tokens_per_tile"] == 256
    assert sum(stage["params"] for stage in summary["stages"]) == summary["total"]


@pytest.mark.slow
def test_2b_preset_split_over_tp_and_pp(repo_root):
    """TP=2, PP=2 with 12 LLM layers on stage 0: per-stage parameters of the meta-device model, the
    memory model's own counts equal to them, 1F1B's in-flight micro-batches and the logits on the last.

    Fault caught: the memory model's LLM qkv bias left out (its counts no longer match the model)."""
    summary = _summary(repo_root, "--config", "sail_vl_2b", "parallel.tensor=2", "parallel.pipeline=2",
                       "parallel.first_stage_llm_layers=12")
    assert {"vision", "projector", "language", "total"} <= set(summary)
    assert 2.08e9 < summary["total"] < 2.10e9
    first, last = summary["stages"]
    assert (first["llm_layers"], last["llm_layers"]) == (12, 16)
    # TP halves the sharded weights: the two stages together hold a bit more than half the model
    assert summary["total"] / 2 < first["params"] + last["params"] < summary["total"] * 0.6
    assert first["total_gib"] > first["weights_gib"] > 0
    assert 0 < summary["vision_share_of_flops"] < 1
    assert isinstance(summary["suggested_first_stage_llm_layers"], int)
    # the memory model counts, per stage and TP shard, what the meta-device model holds
    for stage in summary["stages"]:
        assert stage["params_estimated"] == stage["params"], stage
    assert first["in_flight"] == 2 and last["in_flight"] == 1  # 1F1B: stage 0 holds pp micro-batches
    assert first["logits_gib"] == 0 < last["logits_gib"]


@pytest.mark.slow
def test_frozen_parts_hold_no_gradients_or_optimizer_state(repo_root):
    """--trainable projector (SAIL-VL's alignment stage): weights of the whole model, gradients and Adam
    state of the projector alone (8,662,016 parameters: 4 and 12 bytes each at DP=1).

    Fails if frozen parameters are charged a gradient buffer or optimizer state."""
    (stage,) = _summary(repo_root, "--config", "sail_vl_2b", "--trainable", "projector")["stages"]
    assert stage["grads_gib"] == pytest.approx(8_662_016 * 4 / 2**30, abs=1e-3)
    assert stage["optimizer_gib"] == pytest.approx(8_662_016 * 12 / 2**30, abs=1e-3)
    assert stage["weights_gib"] == pytest.approx(2_089_762_304 * 2 / 2**30, abs=1e-3)
