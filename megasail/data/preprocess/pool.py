"""Preprocessing units in spawned worker processes: the pool, its shared progress counters, and a
worker's death turned into a message that says which units to redo with --resume."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from megasail.child_processes import die_with_parent
from megasail.data.preprocess.sources import WorkUnit
from megasail.data.preprocess.worker import UnitContext, process_unit


class WorkerDied(RuntimeError):
    """A worker process died (killed, out of memory, crashed) and its units cannot finish in this run."""


# Test hook: the worker process that runs the unit with this index kills itself with SIGKILL.
KILL_UNIT_ENV = "MEGASAIL_PREPROCESS_KILL_UNIT"

_WORKER_CTX: UnitContext | None = None
_WORKER_COUNTERS = None  # (records, bytes) shared with the main process for the progress bar


def _init_worker(ctx: UnitContext, counters, parent_pid: int, from_main_thread: bool) -> None:
    global _WORKER_CTX, _WORKER_COUNTERS
    # a killed run's workers would wait for units forever (they hold both ends of the task queue)
    die_with_parent(parent_pid, death_signal=from_main_thread)
    _WORKER_CTX, _WORKER_COUNTERS = ctx, counters


def _add_to_shared_counters(records: int, nbytes: int) -> None:
    for counter, delta in zip(_WORKER_COUNTERS, (records, nbytes), strict=True):
        with counter.get_lock():
            counter.value += delta


def _run_unit_in_worker(unit: WorkUnit) -> dict:
    if os.environ.get(KILL_UNIT_ENV) == str(unit.index):
        os.kill(os.getpid(), signal.SIGKILL)
    return process_unit(unit, _WORKER_CTX, _add_to_shared_counters)


def run_units_in_pool(
    units: list[WorkUnit],
    ctx: UnitContext,
    workers: int,
    on_reports: Callable[[list[dict]], None],
    show: Callable[[int, int], None],
    died_message: Callable[[list[dict]], str],
) -> None:
    """Run `units` on min(workers, len(units)) spawned processes.

    on_reports(reports) gets each poll's finished unit reports (in completion order); show(records,
    bytes) the progress since the last poll; a dead worker raises WorkerDied(died_message(reports of
    the poll not yet handed to on_reports)). On any
    way out but success the units still running are stopped (they are redone on --resume).
    """
    spawn = mp.get_context("spawn")
    counters = (spawn.Value("q", 0), spawn.Value("q", 0))
    shown = [0, 0]
    pool = ProcessPoolExecutor(
        min(workers, len(units)),
        mp_context=spawn,
        initializer=_init_worker,
        initargs=(ctx, counters, os.getpid(), threading.current_thread() is threading.main_thread()),
    )
    clean = False
    try:
        running = {pool.submit(_run_unit_in_worker, u): u for u in units}
        while running:
            done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            finished = []
            for future in done:
                running.pop(future)
                try:
                    finished.append(future.result())
                except BrokenProcessPool:
                    raise WorkerDied(died_message(finished)) from None
            if finished:
                on_reports(finished)
            # Read without the lock: a killed worker may have died holding it.
            now = [c.get_obj().value for c in counters]
            show(now[0] - shown[0], now[1] - shown[1])
            shown = now
        clean = True
    finally:
        if clean:
            pool.shutdown(wait=True)
        else:
            _stop(pool)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and terminate the workers still running a unit."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(5)
