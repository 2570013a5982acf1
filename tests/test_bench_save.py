"""tools/bench_save.py runs as a user runs it and reports what each optimizer layout's save wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TINY = ["model.language.vocab_size=2048", "model.image_token_id=2000", "model.language.num_layers=2"]


@pytest.mark.distributed
@pytest.mark.slow
def test_bench_save_table_for_both_optimizer_layouts(repo_root, tmp_path):
    """Two DP=2 rows, fully_reshardable then dp_reshardable, each named by the saved megasail.json: both
    ranks write shard files, the two layouts write about the same bytes (the same state), and the peaks
    are resident sizes at least as large as what the save added.

    Fault caught: the worker not passing checkpoint.optimizer_sharding to save_checkpoint (both rows
    name dp_reshardable)."""
    out_json = tmp_path / "rows.json"
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")},
        "PYTHONPATH": repo_root,
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "tools/bench_save.py", "--dp", "2", "--repeats", "1", "--no-default-model",
           "--json", str(out_json), *TINY]  # fmt: skip
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| optimizer sharding | DP |" in proc.stdout
    rows = json.loads(out_json.read_text())
    assert [(r["sharding"], r["dp"]) for r in rows] == [("fully_reshardable", 2), ("dp_reshardable", 2)]
    for r in rows:
        assert r["written_rank0_mib"] > 0 and r["written_other_mib"] > 0
        assert r["save_s"] > 0 and r["max_peak_gib"] >= r["rank0_peak_gib"] >= r["rank0_grown_gib"]
    totals = [r["written_rank0_mib"] + r["written_other_mib"] for r in rows]
    assert totals[1] == pytest.approx(totals[0], rel=0.05)
