"""Where a checkpoint lives on disk, read without writing (publish.py does every write).

    ROOT/latest_checkpointed_iteration.txt   "12\\n": the marker, written last, by rename
    ROOT/iter_0000012/                       a published step dir (iter_0000012.tmp renamed when complete)
        .metadata, __*_*.distcp, common.pt, metadata.json    (dist_checkpointing, torch_dist)
        megasail.json                                         (meta.py: iteration, stage, config, layout ...)

A directory counts as published when it holds megasail.json; the marker always names a published one.
"""

from __future__ import annotations

import logging
import os
import re

log = logging.getLogger(__name__)

MARKER = "latest_checkpointed_iteration.txt"
META = "megasail.json"
STEP_DIR = re.compile(r"^iter_(\d{7,})$")


def step_dir(root: str, iteration: int) -> str:
    """ROOT/iter_0000012 for iteration 12 (Megatron-LM's naming)."""
    return os.path.join(root, f"iter_{iteration:07d}")


def tmp_dir(root: str, iteration: int) -> str:
    """ROOT/iter_0000012.tmp: where a save writes before it is published."""
    return step_dir(root, iteration) + ".tmp"


def is_published(path: str) -> bool:
    """Whether ``path`` is a complete step dir (it holds megasail.json, written just before the rename)."""
    return os.path.isfile(os.path.join(path, META))


def published_steps(root: str) -> list[tuple[int, str]]:
    """(iteration, path) of every published step dir under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and is_published(os.path.join(root, name)):
            found.append((int(m[1]), os.path.join(root, name)))
    return sorted(found)


def marked_iteration(root: str) -> int | None:
    """The iteration the marker names, or None without a (readable) marker."""
    try:
        with open(os.path.join(root, MARKER)) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def latest_checkpoint(root: str) -> str | None:
    """The step dir the marker names (ROOT itself when it is a step dir); None when ROOT has none.

    Without a marker (a first save killed between publishing and writing it), or when the marked dir
    is gone (deleted by hand, or a re-save of the same iteration killed between its two renames), the
    newest published step dir is returned: a published dir is always complete.
    Raises ValueError when the marker holds something other than an iteration number.
    """
    if is_published(root):
        return root
    marker = os.path.join(root, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            text = f.read().strip()
        if not text.isdigit():
            raise ValueError(f"{marker}: expected an iteration number, found {text[:80]!r}")
        path = step_dir(root, int(text))
        if is_published(path):
            return path
        log.warning(
            "%s names iteration %s but %s does not exist: using the newest published step dir",
            marker,
            text,
            os.path.join(path, META),
        )
    steps = published_steps(root)
    return steps[-1][1] if steps else None


def require_checkpoint(path: str) -> str:
    """``latest_checkpoint(path)``, or FileNotFoundError naming what is missing."""
    step = latest_checkpoint(path)
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {path} (no {MARKER} and no iter_* dir with {META})")
    return step


def steps_after(root: str, iteration: int) -> list[int]:
    """Published iterations under ``root`` later than ``iteration`` (the marker's included)."""
    later = {it for it, _ in published_steps(root) if it > iteration}
    marked = marked_iteration(root) if os.path.isdir(root) else None
    if marked is not None and marked > iteration:
        later.add(marked)
    return sorted(later)


def earlier_published(step: str) -> str | None:
    """The newest published step dir beside ``step`` with a smaller iteration, or None."""
    root = os.path.dirname(os.path.abspath(step))
    m = STEP_DIR.match(os.path.basename(os.path.abspath(step)))
    earlier = [p for it, p in published_steps(root) if m and it < int(m[1])]
    return earlier[-1] if earlier else None
