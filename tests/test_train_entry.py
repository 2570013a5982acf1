"""pretrain_vlm.py as a user runs it: one process, and torchrun with two (TP=2) saving a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_utils import REPO, make_datasets

from megasail.runtime import free_port

pytestmark = [pytest.mark.distributed]

TEST_SIZES = [
    "data.seq_length=512",
    "data.num_workers=0",
    "data.max_tiles=1",
    "data.pack_window=8",
    "data.pack_chunk_samples=32",
    "model.vision.num_layers=1",
    "model.language.num_layers=2",
]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return make_datasets(str(tmp_path_factory.mktemp("entry_data")))


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def test_single_process_run_writes_metrics_and_a_checkpoint(datasets, tmp_path):
    """`python pretrain_vlm.py --config tiny.yaml --stage A.yaml --stage B.yaml train.iters=2`: exit 0,
    one step in each stage (the first one's budget is one global batch), two metric lines, a console
    line per step, a published checkpoint named in the last line."""
    logdir, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(
        f"name: first\nbudget_samples: 1\ntrainable: [projector]\nsources: [{{prefix: {datasets['a']}}}]\n"
    )
    second.write_text(
        f"name: second\ntrainable: [vision, projector, language]\nsources: [{{prefix: {datasets['b']}}}]\n"
    )
    cmd = [
        sys.executable,
        "pretrain_vlm.py",
        "--config",
        "examples/configs/tiny.yaml",
        "--stage",
        str(first),
        "--stage",
        str(second),
        "train.iters=2",
        f"logging.dir={logdir}",
        f"checkpoint.save={ckpt}",
        *TEST_SIZES,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step      1 | first" in proc.stdout and "step      2 | second" in proc.stdout
    assert "FLOPs per step = tiles x (1 x ViT" in proc.stdout and "FLOPs per step = tiles x (3 x ViT" in proc.stdout
    lines = (logdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert f"checkpoint {ckpt}/iter_0000002" in proc.stdout


@pytest.mark.slow
def test_torchrun_tensor_parallel_run_and_a_refused_config(datasets, tmp_path):
    """torchrun --nproc-per-node 2 ... parallel.tensor=2 trains and saves; a layout that does not divide
    the model stops before any step with exit 2 and a message naming both sides."""
    prefix = datasets["a"]
    logdir, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "pretrain_vlm.py",
        "--config",
        "examples/configs/tiny.yaml",
        f"data.path={prefix}",
        *TEST_SIZES,
    ]
    proc = subprocess.run(
        base + ["parallel.tensor=2", "train.iters=2", f"logging.dir={logdir}", f"checkpoint.save={ckpt}"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len((logdir / "metrics.jsonl").read_text().splitlines()) == 2
    assert (ckpt / "iter_0000002").is_dir()
    bad = [
        sys.executable,
        "pretrain_vlm.py",
        "--config",
        "examples/configs/tiny.yaml",
        f"data.path={prefix}",
        "parallel.tensor=3",
        *TEST_SIZES,
    ]
    proc = subprocess.run(bad, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "world size 1 is not divisible by parallel.tensor=3" in proc.stderr, (
        proc.stderr[-2000:]
    )
