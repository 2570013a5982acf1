"""Every write to a checkpoint root: the tmp dir, megasail.json, the rename, the marker, pruning and
moving old steps aside. One process (rank 0) calls these.

A save writes its tensors into ROOT/iter_NNNNNNN.tmp (``start_tmp_dir``), then ``publish_step`` puts
megasail.json into it (fsync of file and dir), renames it to ROOT/iter_NNNNNNN (fsync of ROOT) and
writes the marker by temp file + rename (fsync of file and ROOT). A save killed at any point leaves
either a .tmp dir (never read, removed by the next save) or a published dir the marker does not name
yet: the marker always names a complete checkpoint, and never moves backwards.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from megasail.checkpoint.layout import (
    MARKER,
    META,
    STEP_DIR,
    latest_checkpoint,
    marked_iteration,
    published_steps,
    step_dir,
    tmp_dir,
)
from megasail.checkpoint.meta import CheckpointMeta

log = logging.getLogger(__name__)


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def remove_stale_tmp(root: str) -> None:
    """Delete *.tmp entries left by a save killed midway (before a new save starts)."""
    for name in os.listdir(root):
        if name.endswith(".tmp"):
            log.warning("removing %s left by an interrupted save", os.path.join(root, name))
            path = os.path.join(root, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def start_tmp_dir(root: str, iteration: int) -> str:
    """Create ROOT (if needed) and an empty ROOT/iter_NNNNNNN.tmp, after removing stale .tmp entries;
    returns the tmp dir the shards go into."""
    os.makedirs(root, exist_ok=True)
    remove_stale_tmp(root)
    tmp = tmp_dir(root, iteration)
    os.makedirs(tmp)
    return tmp


def write_marker(root: str, iteration: int) -> None:
    """Point ROOT's marker at ``iteration`` (temp file + rename, both fsynced)."""
    marker_tmp = os.path.join(root, MARKER + ".tmp")
    _write_synced(marker_tmp, f"{iteration}\n")
    os.replace(marker_tmp, os.path.join(root, MARKER))
    fsync_dir(root)


def publish_step(root: str, meta: CheckpointMeta, keep_last: int) -> str:
    """Publish ROOT/iter_NNNNNNN.tmp (NNNNNNN = meta.iteration, shards complete) as ROOT/iter_NNNNNNN:
    megasail.json into it, the rename, then the marker unless it names a later step; then ``prune``.
    Returns the step dir."""
    iteration = meta.iteration
    tmp, final = tmp_dir(root, iteration), step_dir(root, iteration)
    _write_synced(os.path.join(tmp, META), meta.dumps(final))
    fsync_dir(tmp)
    if os.path.exists(final):  # re-saving an iteration: move the old one aside, drop it after
        os.rename(final, final + ".replaced.tmp")
    os.rename(tmp, final)
    fsync_dir(root)
    marked = marked_iteration(root)
    if marked is not None and marked > iteration:
        # the marker never moves backwards: a later step of this directory stays the one a resume takes
        log.warning(
            "%s names iteration %d, later than %d: left as it is",
            os.path.join(root, MARKER),
            marked,
            iteration,
        )
    else:
        write_marker(root, iteration)
    if os.path.exists(final + ".replaced.tmp"):
        shutil.rmtree(final + ".replaced.tmp")
    prune(root, keep_last)
    return final


def prune(root: str, keep_last: int) -> list[str]:
    """Delete the oldest published step dirs beyond keep_last (<= 0 keeps all); the marker's is kept.
    Returns the deleted dirs."""
    if keep_last <= 0:
        return []
    steps = published_steps(root)
    latest = latest_checkpoint(root)
    removed = []
    for _, path in steps[: max(0, len(steps) - keep_last)]:
        if path != latest:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def supersede(root: str) -> str | None:
    """Move every step dir and the marker of ``root`` into ROOT/superseded_<UTC time>/, so a run can
    start over in the directory without deleting what was there; returns that dir (None if empty)."""
    names = [n for n in os.listdir(root) if STEP_DIR.match(n) or n == MARKER] if os.path.isdir(root) else []
    if not names:
        return None
    aside = os.path.join(root, "superseded_" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(aside, exist_ok=True)
    for name in sorted(names, key=lambda n: n == MARKER, reverse=True):  # the marker first
        os.rename(os.path.join(root, name), os.path.join(aside, name))
    fsync_dir(root)
    return aside
