"""wandb as pretrain_vlm.py uses it: offline without a login, the resolved config as the run's config, the
same loss per step as metrics.jsonl, a resumed run continuing the same wandb run, nothing written into the
working directory when logging.dir is unset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_utils import REPO, make_datasets
from wandb_utils import offline_runs

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SMALL = ["data.seq_length=512", "data.num_workers=0", "data.max_tiles=1", "model.vision.num_layers=1",
         "model.language.num_layers=2", "logging.wandb=true"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return make_datasets(str(tmp_path_factory.mktemp("wandb_data")))


def _train(cwd, home, *overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO, HOME=str(home))  # no ~/.netrc login: offline
    cmd = [sys.executable, os.path.join(REPO, "pretrain_vlm.py"), "--config",
           os.path.join(REPO, "examples/configs/tiny.yaml"), *SMALL, *overrides]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_wandb_mirrors_metrics_offline_and_a_resume_continues_its_run(datasets, tmp_path):
    """Two steps, then a resume to four, logging.wandb=true and no login: wandb writes offline runs into
    LOGGING_DIR; their history holds metrics.jsonl's loss at every step, both runs have one id, and the run's
    config is the resolved one (the vocabulary taken from the dataset, 512).

    Fails if the run id is not kept in the checkpoint (the resume starts a second wandb run), if wandb goes
    online without a login, or if the config passed to wandb.init is not the resolved config."""
    logdir, ckpt = tmp_path / "logs", tmp_path / "ckpt"
    common = [f"data.path={datasets['a']}", f"logging.dir={logdir}", f"checkpoint.save={ckpt}",
              f"checkpoint.load={ckpt}"]
    _train(tmp_path, tmp_path / "home", *common, "train.iters=2")
    _train(tmp_path, tmp_path / "home", *common, "train.iters=4")
    runs = offline_runs(str(logdir))
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]
    metrics = {r["step"]: r["loss"] for r in map(json.loads, (logdir / "metrics.jsonl").read_text().splitlines())}
    history = {step: row["loss"] for run in runs for step, row in run["history"].items()}
    assert sorted(metrics) == [1, 2, 3, 4] and history == pytest.approx(metrics, rel=1e-12)
    assert runs[0]["config"]["model"]["language"]["vocab_size"] == 512


def test_without_logging_dir_nothing_is_written_into_the_working_directory(datasets, tmp_path):
    """logging.wandb=true and no logging.dir, started from an empty working directory: nothing appears in it
    (wandb's files go to ~/.cache/megasail).

    Fails if wandb is given no directory (it writes ./wandb into the working directory)."""
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    _train(workdir, home, f"data.path={datasets['a']}", "train.iters=1")
    assert sorted(os.listdir(workdir)) == []
    assert offline_runs(str(home / ".cache" / "megasail"))
