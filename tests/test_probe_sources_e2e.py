"""Source probing end to end on the tiny model (CPU): examples/curate_sft.sh's demo, then quality mode on the
same probes directory, killed mid-probe and rerun, and fit_scaling.py reading a probe's evaluations.

The demo (megasail/curation/probe_demo.py): a base checkpoint trained 40 steps on colour questions; candidates
corrupted (answers shuffled between pictures), good (more correct data), duplicate (a copy of the base);
each probe trains 48 samples (12 steps) at half base, half candidate, then answers 60 held-out questions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_SETTINGS = ["data.seq_length=320", "data.global_batch_size=4", "data.num_workers=0", "data.max_tiles=1",
                 "data.pack_window=8", "data.pack_chunk_samples=32", "model.vision.num_layers=1",
                 "model.language.num_layers=2", "optim.warmup_steps=0", "logging.wandb=false", "optim.lr=1e-3",
                 "optim.min_lr=5e-4"]  # fmt: skip  (what curate_sft.sh's demo passes)


def _env():
    bindir = os.path.dirname(sys.executable)
    return dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", MEGASAIL_NO_INSTALL="1",
                PATH=bindir + os.pathsep + os.environ["PATH"])  # fmt: skip


def _mtimes(directory) -> dict[str, int]:
    """Modification times of every file under directory (a retrained probe rewrites its checkpoint)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = os.stat(path, follow_symlinks=False).st_mtime_ns
    return out


def _steps(metrics_path) -> list[int]:
    return [json.loads(line)["step"] for line in open(metrics_path) if line.strip()]


@pytest.mark.slow
def test_curate_demo_drops_the_corrupted_source_and_quality_resumes_after_a_kill(tmp_path):
    """curate_sft.sh: the corrupted source is dropped, good kept, the stage file holds no corrupted data and
    the printed command trains it. quality mode on the same directory: corrupted ranks last, the duplicate's
    gain interval holds 0; the probes incremental already finished are reused, not retrained (their files'
    mtimes unchanged); the duplicate probe, killed (SIGKILL to the whole process group) after its first
    save, resumes from that save on rerun (the save's files untouched, the budget finished).
    Fault caught: a killed probe restarted from --init (checkpoint.load dropped from the probe's command,
    overwrite on: the first save is written again; a check of metrics.jsonl's steps alone missed it:
    each step logged once). The finished-probe skip's fault is caught in test_probe_sources.py.
    Measured on 2 shared cores: about 5.5 min when the machine is quiet, 11 min under heavy load."""
    out = tmp_path / "curate"
    proc = subprocess.run(["bash", "examples/curate_sft.sh", "--out", str(out)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=3000)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "probes" / "summary.json").read_text())
    decisions = {d["candidate"]: d for d in summary["decisions"]}
    assert decisions["corrupted"]["decision"] == "dropped", summary["table"]
    assert decisions["good"]["decision"] == "kept", summary["table"]
    import yaml

    stage = yaml.safe_load((out / "sft_curated.yaml").read_text())
    owners = {source["name"].split("/")[0] for source in stage["sources"]}
    assert "corrupted" not in owners and {"base", "good"} <= owners, stage
    print(summary["table"])
    assert "pretrain_vlm.py" in proc.stdout and str(out / "sft_curated.yaml") in proc.stdout

    probes = out / "probes"
    finished = {name: _mtimes(probes / name) for name in os.listdir(probes) if (probes / name / "scores.json").exists()}
    assert set(finished) == {"baseline", "inc01_corrupted", "inc02_good", "inc03_duplicate"}
    data = out / "data"
    cmd = [sys.executable, "tools/probe_sources.py", "--base-config", "examples/configs/tiny.yaml",
           "--init", str(out / "base_checkpoint"), "--candidates", str(data / "candidates.yaml"),
           "--base-mixture", str(data / "base.yaml"), "--benchmark", str(data / "benchmark" / "colours.jsonl"),
           "--budget-samples", "48", "--mode", "quality", "--out", str(probes), "--save-interval", "4",
           "--eval-saves", "--eval-args=--max-new-tokens 8", "--no-progress", "--", *DEMO_SETTINGS]  # fmt: skip
    killed = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    marker = probes / "duplicate" / "ckpt" / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 1800
    while not marker.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert killed.poll() is None, "the quality run ended before the duplicate probe's first save"
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    saved = int(marker.read_text())
    assert not (probes / "duplicate" / "scores.json").exists()
    first_save = probes / "duplicate" / "ckpt" / f"iter_{saved:07d}"
    first_save_files = _mtimes(first_save)  # a resumed run loads it; a run started over would write it again

    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, before in finished.items():
        assert _mtimes(probes / name) == before, f"{name} was touched by the rerun"
    assert saved >= 4 and first_save_files and _mtimes(first_save) == first_save_files
    steps = _steps(probes / "duplicate" / "metrics.jsonl")
    assert set(range(1, 13)) <= set(steps) and steps[-1] == 12, steps

    summary = json.loads((probes / "summary.json").read_text())
    by_name = {p["name"]: p for p in summary["probes"]}
    assert by_name["corrupted"]["same_as"] == "inc01_corrupted" and by_name["good"]["same_as"] == "inc02_good"
    assert by_name["corrupted"]["rank"] == 3, summary["table"]
    low, high = by_name["duplicate"]["gain"]["interval"]
    assert low <= 0 <= high, summary["table"]
    print(summary["table"])

    # the duplicate's saves were each evaluated: points for fit_scaling.py --runs
    assert sorted(os.listdir(probes / "duplicate" / "eval")) == ["iter_0000004", "iter_0000008", "iter_0000012"]
    fits = tmp_path / "fits"
    subprocess.run([sys.executable, "tools/fit_scaling.py", "--runs", str(probes / "duplicate"), "--benchmark",
                    "colours", "--x", "samples", "--resamples", "100", "--no-plot", "--output-dir", str(fits)],
                   cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    fit = json.loads((fits / "fit.json").read_text())  # one run: one series, at the top level
    assert fit["n_points"] == 3 and fit["x_range"] == [16.0, 48.0]
    assert fit["log_linear"]["status"] == "ok" and fit["log_linear"]["b"] is not None
