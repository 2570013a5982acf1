"""Workers die with their trainer: kill -9 of a process reading with the real loader (fork, spawn,
forkserver workers) or of a preprocessing run leaves no worker and no resource tracker behind.

The trainer runs as ``python tests/test_worker_lifetime.py START CREATOR BLOCK PREFIX``: it reads four
micro-batches with 2 workers, prints "ready" and idles, while each worker is stuck building its third
micro-batch (a decode that hangs): in C code holding the GIL (`gil`: only the kernel's parent-death
signal can end it) or in a plain sleep (`sleep`: the watch thread can).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
from process_utils import assert_all_die, descendants, is_resource_tracker

from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
from megasail.data.loader.data_loader import MultimodalDataLoader
from megasail.data.loader.worker import MicroBatchBuilder

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
HANG_SECONDS = 600


class HangingBuilder(MicroBatchBuilder):
    """Builds each worker's first two micro-batches, then hangs in the third (`block`: gil or sleep),
    having written `hung_dir/PID` to say so."""

    def __init__(self, block: str, hung_dir: str, *args):
        super().__init__(*args)
        self.block, self.hung_dir, self.built = block, hung_dir, 0

    def __getitem__(self, plan):
        self.built += 1
        if self.built > 2:
            time.sleep(1.0)  # the worker's queue thread sends the finished micro-batches meanwhile
            with open(os.path.join(self.hung_dir, str(os.getpid())), "w"):
                pass
            if self.block == "gil":  # PyDLL keeps the GIL through the call: no Python thread runs
                ctypes.PyDLL(None).sleep(HANG_SECONDS)
            time.sleep(HANG_SECONDS)
        return super().__getitem__(plan)


def _trainer(start: str, creator: str, block: str, prefix: str, hung_dir: str) -> None:
    config = DataConfig(stages=[StageConfig("only", [SourceConfig(prefix)])], seq_length=1024, global_batch_size=2,
                        max_tiles=2, num_workers=2, prefetch_factor=2, worker_start=start, pack_chunk_samples=16,
                        pack_window=8, decode_backend="pil")
    loader = MultimodalDataLoader(config)
    loader.builder = HangingBuilder(block, hung_dir, config, loader.builder.sources_by_stage)
    if creator == "thread":  # the workers' parent thread ends here; the workers must not end with it
        thread = threading.Thread(target=lambda: [next(loader) for _ in range(2)])
        thread.start()
        thread.join()
        time.sleep(0.5)
    else:
        next(loader), next(loader)
    next(loader), next(loader)
    print("ready", flush=True)
    time.sleep(HANG_SECONDS)


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    from test_loader import write_prefix

    return write_prefix(tmp_path_factory.mktemp("lifetime") / "ds", 24, 1)


def _wait_ready(proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.strip() == "ready":
                return
            if not line:
                break
    raise AssertionError(f"the trainer never got ready (exit status {proc.poll()})")


def kill_trainer_and_check(argv: list[str], expect_workers: int, expect_trackers: int, env=None,
                           ready=_wait_ready) -> None:
    """Start argv, wait until `ready(proc)`, SIGKILL it alone, and check that each of its descendants
    (expected: that many workers and resource trackers) is dead 5 s later."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **(env or {})},
                            start_new_session=True)  # its own group: a failing run is cleaned up below
    try:
        ready(proc)
        tree = descendants(proc.pid)
        trackers = [p for p in tree if is_resource_tracker(p)]
        assert len(trackers) == expect_trackers, [p.cmdline() for p in tree]
        assert len(tree) - len(trackers) >= expect_workers, [p.cmdline() for p in tree]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert_all_die(tree, timeout=5.0, what="workers or resource trackers")
    except AssertionError as error:
        _kill_group(proc)
        raise AssertionError(f"{error}\n--- stderr of {argv[1]} ---\n{proc.stderr.read()[-4000:]}") from None
    finally:
        _kill_group(proc)
        proc.stdout.close()
        proc.stderr.close()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever a failing run left (its workers hold its stderr)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.parametrize("start,creator,block", [
    ("fork", "main", "gil"),
    ("spawn", "main", "gil"),
    pytest.param("forkserver", "main", "sleep", marks=pytest.mark.slow),  # no death signal there
    ("fork", "thread", "sleep"),
])
def test_loader_workers_die_with_a_killed_trainer(prefix, tmp_path, start, creator, block):
    """kill -9 of the trainer alone: its 2 loader workers, hung in a micro-batch, are dead within 5 s,
    and so is the resource tracker of spawn/forkserver workers (it exits by itself once the trainer and
    the workers, which hold its pipe, are gone; nothing kills it). Workers started from a thread that
    then ends keep working (the trainer reads two more micro-batches after it) and die with the trainer.

    Faults caught: no die_with_parent in the workers (fork: 600 s in the hung micro-batch; torch's own
    watchdog only looks between micro-batches); the death signal removed (the `gil` cases: the watch
    thread cannot run while C code holds the GIL); the watch thread removed (the `thread` and
    forkserver cases: a forkserver worker's parent is the fork server, which outlives the trainer while
    any worker holds its liveness pipe, so the death signal cannot reach it); the
    death signal armed in workers started from a thread (they die with the thread: the trainer's next
    micro-batch fails with "DataLoader worker ... exited unexpectedly")."""
    hung = tmp_path / "hung"
    hung.mkdir()

    def workers_hung(proc):
        _wait_ready(proc)
        deadline = time.monotonic() + 60
        while len(list(hung.iterdir())) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "the workers never reached the hang"
            time.sleep(0.1)

    argv = [sys.executable, os.path.abspath(__file__), start, creator, block, prefix, str(hung)]
    kill_trainer_and_check(argv, expect_workers=2, expect_trackers=0 if start == "fork" else 1, ready=workers_hung)


@pytest.mark.slow
def test_pretrain_vlm_workers_die_with_a_killed_trainer(tmp_path):
    """The real trainer: `pretrain_vlm.py` (one process, tiny model) reading with 2 spawned workers,
    killed with SIGKILL after its first logged step: its workers and resource tracker are dead 5 s later.

    Fault caught: no die_with_parent in the workers (torch's own watchdog let spawned workers of an
    idle trainer run on for 10-15 s here)."""
    from train_utils import make_dataset

    prefix = make_dataset(str(tmp_path / "data"), "a", 48, 1)
    metrics = tmp_path / "logs" / "metrics.jsonl"

    def first_step_logged(proc):
        deadline = time.monotonic() + 300
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "the trainer logged no step"
            time.sleep(0.2)

    argv = [sys.executable, os.path.join(REPO, "pretrain_vlm.py"), "--config", os.path.join(REPO, "examples/configs/tiny.yaml"),
            f"data.path={prefix}", "data.num_workers=2", "data.worker_start=spawn", "data.seq_length=512",
            "data.max_tiles=1", "data.pack_window=8", "data.pack_chunk_samples=32", "model.vision.num_layers=1",
            "model.language.num_layers=2", "train.iters=100000", f"logging.dir={tmp_path / 'logs'}",
            "logging.wandb=false"]
    kill_trainer_and_check(argv, expect_workers=2, expect_trackers=1, ready=first_step_logged)


def test_preprocessing_workers_die_with_a_killed_run(tmp_path):
    """kill -9 of a `preprocess_data.py --workers 2` main process while its units run: the two spawned
    unit workers (which would otherwise wait for more units forever: they hold both ends of the task
    queue) and the resource tracker are dead within 5 s.

    Fault caught: no die_with_parent in the pool initializer (workers still running after 5 s)."""
    from fixtures.multimodal_data import good_conversation_records, make_tiny_tokenizer, write_jsonl

    tokenizer = make_tiny_tokenizer(str(tmp_path / "tok"))
    jsonl = write_jsonl(str(tmp_path / "in.jsonl"),
                        [r for r in good_conversation_records(24, ["x.jpg"]) if "image" not in r])
    parts = tmp_path / "ds.parts"

    def units_running(proc):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # both workers have started a unit (each sleeps 30 s in it)
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            if len(list(parts.glob("*"))) >= 1 and len(descendants(proc.pid)) >= 3:
                time.sleep(1.0)
                return
            time.sleep(0.1)
        raise AssertionError("the preprocessing workers never started")

    argv = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", jsonl, "--tokenizer",
            tokenizer, "--output-prefix", str(tmp_path / "ds"), "--lines-per-unit", "4", "--workers", "2",
            "--no-progress"]
    kill_trainer_and_check(argv, expect_workers=2, expect_trackers=1, env={"MEGASAIL_PREPROCESS_UNIT_DELAY": "30"},
                           ready=units_running)


if __name__ == "__main__":  # the trainer of the loader tests (spawned workers re-import this module)
    _trainer(*sys.argv[1:6])
