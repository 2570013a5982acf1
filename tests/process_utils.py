"""Process trees of the kill -9 tests: what a process started, and whether all of it died."""

from __future__ import annotations

import signal
import time

import psutil


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below `pid` (children, their children, ...)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def is_dead(process: psutil.Process) -> bool:
    """Gone, or a zombie (exited, waiting to be reaped by whoever inherited it)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid} ({process.name()}: {' '.join(process.cmdline())[:120]})"
    except psutil.Error:
        return f"pid {process.pid}"


def is_resource_tracker(process: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def assert_all_die(processes: list[psutil.Process], timeout: float = 5.0, what: str = "processes") -> None:
    """Wait up to `timeout` seconds for every process to die; SIGKILL the survivors (so a failing test
    leaves nothing behind either) and fail naming them."""
    deadline = time.monotonic() + timeout
    alive = [p for p in processes if not is_dead(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if not is_dead(p)]
    if alive:
        names = [describe(p) for p in alive]
        for p in alive:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        raise AssertionError(f"{len(alive)} {what} still running {timeout:.0f} s after their parent died: {names}")


def kill_leftovers(processes: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGKILL what a killed parent left running (code we do not own, e.g. megatron's spawned save
    Manager), except multiprocessing's resource trackers, which must then exit by themselves (unlinking
    what their clients leaked); fail if anything is still running after `timeout` seconds."""
    for p in processes:
        if not is_resource_tracker(p) and not is_dead(p):
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
    assert_all_die(processes, timeout, "processes (resource trackers after their clients died)")
