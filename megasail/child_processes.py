"""Worker processes that die with the process that started them (loader and preprocessing workers).

A trainer killed with SIGKILL (a scheduler's teardown, the OOM killer, a user) runs no cleanup, so its
workers must see to it themselves. `die_with_parent`, called first thing in a worker, uses two means:

- Linux's parent-death signal (prctl PR_SET_PDEATHSIG, SIGKILL): the kernel kills the worker the
  moment its parent exits, even while the worker is stuck in C code holding the GIL. The kernel's
  "parent" is the *thread* that forked the worker, so the signal would also fire when a short-lived
  thread that created the workers ends; it is armed only for workers started from the main thread.
- A watch thread on the parent (a pidfd where the kernel has them, else polling the parent pid),
  for other platforms and for workers started from other threads.

multiprocessing's resource tracker (started with spawn/forkserver workers) needs neither: it reads
a pipe whose write ends the trainer and its workers hold, and exits, unlinking what they leaked,
once all of them are gone (tests/test_worker_lifetime.py shows it).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 1.0  # the watch's period where no pidfd is available


def arm_death_signal() -> bool:
    """Ask the kernel to SIGKILL this process when its parent (thread) exits; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: the parent's state is gone with it


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)  # Linux >= 5.3; readable once the process has exited
    except (AttributeError, OSError):
        return None


def _watch(parent_pid: int, direct_child: bool, first_parent: int) -> None:
    fd = _pidfd(parent_pid)
    if fd is not None:
        select.select([fd], [], [])
        _kill_self()
    while True:  # a zombie parent still answers kill(pid, 0), so watch for being reparented too
        time.sleep(POLL_SECONDS)
        reparented = os.getppid() != (parent_pid if direct_child else first_parent)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            reparented = True
        except PermissionError:
            pass
        if reparented:
            _kill_self()


def die_with_parent(parent_pid: int, death_signal: bool = True, direct_child: bool = True) -> None:
    """Make this process die when `parent_pid` (the process that asked for it) exits.

    death_signal: arm PR_SET_PDEATHSIG (pass False when the worker was started from a thread other
    than the main one, see the module docstring). direct_child: the worker is a child of
    `parent_pid` itself (fork, spawn); False for a forkserver worker, whose parent is the fork server.
    The fork server exits when no process holds its liveness pipe, and every forkserver worker holds
    it, so the death signal (relative to the fork server) never fires there: the watch alone ends
    such a worker, once it runs Python again (not while C code holds the GIL).
    """
    first_parent = os.getppid()
    if death_signal:
        arm_death_signal()
    # The parent may have died before the signal was armed: then it will never come.
    if direct_child and os.getppid() != parent_pid:
        _kill_self()
    threading.Thread(target=_watch, args=(parent_pid, direct_child, first_parent),
                     name="megasail-parent-watch", daemon=True).start()


def ignore_stop_signals() -> None:
    """SIGTERM (and SIGINT) are for the trainer: Slurm's --signal and a terminal's Ctrl-C reach every process
    of the job, and a worker that died of them would break the trainer's last save. A worker ignores them
    and ends with its parent (die_with_parent) or when the trainer shuts it down."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_of(parent_pid: int, from_main_thread: bool = True) -> None:
    """Initializer of a helper process that serves the trainer: ignores the trainer's stop signals and dies
    with it (a multiprocessing Manager's or Pool's initializer)."""
    ignore_stop_signals()
    die_with_parent(parent_pid, death_signal=from_main_thread)

