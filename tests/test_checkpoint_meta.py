"""megasail.json (CheckpointMeta) and publishing (publish.py) on plain directories: no model, no torch.

The keys are a contract with existing checkpoints and external tools (docs/checkpoints.md lists them);
the full save/load path is tests/test_checkpoint.py.
"""

from __future__ import annotations

import json
import os

import pytest

from megasail.checkpoint import MARKER, META, CheckpointMeta, latest_checkpoint, read_meta, step_dir
from megasail.checkpoint.publish import publish_step, start_tmp_dir

CHECKPOINT_KEYS = {"iteration", "format_version", "layout", "weights_only", "optimizer_sharding", "saved_at"}


def _meta(step: int, **run) -> CheckpointMeta:
    return CheckpointMeta(
        iteration=step,
        layout={"tp": 2, "pp": 1, "vpp": None, "dp": 1},
        weights_only=False,
        optimizer_sharding="fully_reshardable",
        saved_at="2025-01-31T12:00:00Z",
        run=run,
    )


def test_meta_json_holds_the_run_state_beside_the_checkpoints_own_keys():
    """The run state's keys sit at the top level beside the six the checkpoint writes, which win.

    Fault caught: to_json nesting the run state under "run" (resume reads meta["loader_state"])."""
    run = {
        "stage": {"index": 1, "name": "sft"},
        "loader_state": {"p": 3},
        "config": "x: 1\n",
        "iteration": 99,
    }
    data = _meta(12, **run).to_json()
    assert set(data) == CHECKPOINT_KEYS | {"stage", "loader_state", "config"}
    assert data["iteration"] == 12 and data["format_version"] == 1 and data["layout"]["tp"] == 2
    assert data["stage"] == run["stage"] and data["loader_state"] == {"p": 3}
    parsed = CheckpointMeta.from_json(json.loads(_meta(12, **run).dumps("here")), "here")
    assert parsed.run == {k: v for k, v in run.items() if k != "iteration"} and parsed.stage_index == 1


def test_meta_not_json_serialisable_names_the_step():
    """Fault caught: dumps without the TypeError rewrite (json's message names no step)."""
    with pytest.raises(TypeError, match="checkpoint meta for ROOT/iter_0000012 is not JSON-serialisable"):
        _meta(12, loader_state=object()).dumps("ROOT/iter_0000012")


def test_a_newer_format_version_is_refused_by_every_reader(tmp_path):
    """read_meta (the loop, chat, the converter) and CheckpointMeta.read refuse it, naming the file.

    Fault caught: the format_version check removed from from_json (read_meta returned the dict)."""
    step = tmp_path / "iter_0000003"
    step.mkdir()
    (step / META).write_text(json.dumps({**_meta(3).to_json(), "format_version": 2}))
    (tmp_path / MARKER).write_text("3\n")
    for read in (read_meta, CheckpointMeta.read):
        with pytest.raises(ValueError, match=r"iter_0000003/megasail.json: format_version 2 is newer than"):
            read(str(tmp_path))


def test_a_hand_written_weights_only_meta_reads(tmp_path):
    """The minimum docs/checkpoints.md asks of another tool's checkpoint: iteration, format_version,
    layout, weights_only. Read as stored (no keys added) and typed."""
    data = {
        "iteration": 0,
        "format_version": 1,
        "layout": {"tp": 1, "pp": 1, "vpp": None, "dp": 1},
        "weights_only": True,
    }
    step = tmp_path / "iter_0000000"
    step.mkdir()
    (step / META).write_text(json.dumps(data))
    assert read_meta(str(step)) == data
    meta = CheckpointMeta.read(str(tmp_path))
    assert meta.weights_only and meta.iteration == 0 and meta.run == {} and meta.config is None


def test_publish_step_renames_writes_meta_then_marker_and_never_moves_it_back(tmp_path):
    """Fault caught: publish_step writing the marker whatever it named (a re-publish of step 4 after
    step 8 moved it back to 4)."""
    root = str(tmp_path / "ckpt")
    for iteration in (8, 4):
        tmp = start_tmp_dir(root, iteration)
        open(os.path.join(tmp, "shard"), "w").close()
        assert publish_step(root, _meta(iteration, stage={"index": 0}), keep_last=0) == step_dir(
            root, iteration
        )
    assert sorted(os.listdir(root)) == sorted([MARKER, "iter_0000004", "iter_0000008"])
    assert open(os.path.join(root, MARKER)).read() == "8\n"
    assert latest_checkpoint(root) == step_dir(root, 8)
    assert read_meta(step_dir(root, 4)) == _meta(4, stage={"index": 0}).to_json()
    assert sorted(os.listdir(step_dir(root, 4))) == sorted([META, "shard"])


def test_start_tmp_dir_sweeps_a_killed_saves_leftovers(tmp_path):
    """Fault caught: start_tmp_dir without remove_stale_tmp (a killed save's .tmp dirs pile up)."""
    (tmp_path / "iter_0000002.tmp").mkdir()
    (tmp_path / f"{MARKER}.tmp").write_text("2")
    tmp = start_tmp_dir(str(tmp_path), 3)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003.tmp"] and os.listdir(tmp) == []
