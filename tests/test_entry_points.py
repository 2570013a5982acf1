"""The newcomer's commands and the model tools run as a user would run them (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

SMALL = ["model.language.vocab_size=2048", "model.image_token_id=2000", "model.language.num_layers=2"]


def _run(cmd, repo_root, timeout=600):
    # a fresh shell's environment: no rendezvous variables left by in-process tests
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=repo_root, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.mark.distributed
def test_quickstart_runs_tp2_step_and_prints_loss_and_params(repo_root):
    out = _run(["bash", "examples/quickstart.sh", "--seq-length", "1024", *SMALL], repo_root)
    assert "tp=2" in out and "backend=gloo" in out
    loss = float(re.search(r"loss=([0-9.]+)", out)[1])
    # untrained model over a 2048-token vocabulary: the loss is close to ln(2048) = 7.62
    assert 6.5 < loss < 8.8, out
    counts = dict(re.findall(r"(\w+)=([\d,]+)", out.split("parameters:")[1].splitlines()[0]))
    total = int(counts["total"].replace(",", ""))
    assert total == sum(int(counts[k].replace(",", "")) for k in ("vision", "projector", "language"))


@pytest.mark.distributed
def test_forward_backward_pipeline_parallel(repo_root):
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "examples/forward_backward.py", "--config", "examples/configs/tiny.yaml", "--seq-length", "1024",
                "parallel.pipeline=2", *SMALL], repo_root)
    assert "pp=2" in out and "update_ok=True" in out


def test_forward_backward_help_lists_config_keys(repo_root):
    out = _run([sys.executable, "examples/forward_backward.py", "--help-config"], repo_root)
    assert "parallel.tensor=" in out and "model.language.num_layers=" in out


def test_bench_model_prints_overhead_table(repo_root, tmp_path):
    path = tmp_path / "bench.json"
    out = _run([sys.executable, "tools/bench_model.py", "--config", "examples/configs/tiny.yaml", "--seq-length", "512",
                "--tiles", "1", "--repeats", "1", "--warmup", "0", "--json", str(path), *SMALL], repo_root)
    for row in ("gpt", "sailvl_text", "vision", "sailvl_images"):
        assert re.search(rf"^\| {row} \|", out, re.M), out
    data = json.loads(path.read_text())
    assert {r["row"] for r in data["rows"]} >= {"gpt", "sailvl_text", "sailvl_images", "vision"}
    assert all(r["ms"] > 0 for r in data["rows"])
