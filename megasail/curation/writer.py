"""Recaptioning output: per-writer JSONL files with an atomically committed progress record.

Each data-parallel writer ``w`` appends to ``captions-w.jsonl``, ``filtered-w.jsonl`` and
``rejects-w.jsonl`` (``w`` as 5 digits) and, after each batch, commits ``progress-w.json``: the byte
length of each of its files and its running counts, written to a temporary file, fsynced and renamed
over the old one. Bytes past a committed length belong to a batch that was never committed (a kill
in the middle of a write): ``truncate_to_committed`` cuts them off before a resumed run writes, and
``read_done_ids`` reads only committed bytes. So after a kill -9 at any moment, an id is either in
exactly one committed line (done) or in none (redone), never in two.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
from collections import Counter
from collections.abc import Callable

OUTPUT_KINDS = ("captions", "filtered", "rejects")
_PROGRESS = re.compile(r"progress-(\d{5})\.json$")
_OUTPUT = re.compile(r"(captions|filtered|rejects)-(\d{5})\.jsonl$")


# Test hook: writer W kills itself with SIGKILL after writing the lines of its N-th batch of this run,
# before their commit (MEGASAIL_RECAPTION_KILL_AT="W:N"): the state a kill -9 leaves in that window.
KILL_AT_ENV = "MEGASAIL_RECAPTION_KILL_AT"


def output_name(kind: str, writer: int) -> str:
    return f"{kind}-{writer:05d}.jsonl"


def progress_name(writer: int) -> str:
    return f"progress-{writer:05d}.json"


def read_progress(out_dir: str) -> dict[int, dict]:
    """writer index -> its committed progress record."""
    records = {}
    for path in glob.glob(os.path.join(out_dir, "progress-*.json")):
        match = _PROGRESS.search(path)
        if match:
            with open(path) as f:
                records[int(match.group(1))] = json.load(f)
    return records


def committed_sizes(out_dir: str) -> dict[str, int]:
    """File name -> committed byte length, for every output file of every writer (0 if never committed)."""
    sizes = {os.path.basename(p): 0 for p in glob.glob(os.path.join(out_dir, "*.jsonl")) if _OUTPUT.search(p)}
    for record in read_progress(out_dir).values():
        sizes.update(record.get("files", {}))
    return sizes


def truncate_to_committed(out_dir: str) -> int:
    """Cut every output file back to its committed length; returns the bytes dropped. Run it once,
    before any writer appends (the resumed run's rank 0, then a barrier)."""
    dropped = 0
    for name, size in committed_sizes(out_dir).items():
        path = os.path.join(out_dir, name)
        actual = os.path.getsize(path) if os.path.exists(path) else 0
        if actual < size:
            raise RuntimeError(
                f"{path} holds {actual} bytes but its progress file committed {size}: the output was "
                "changed or lost after it was written; recaption into a new output directory"
            )
        if actual > size:
            with open(path, "r+b") as f:
                f.truncate(size)
            dropped += actual - size
    return dropped


def read_done_ids(out_dir: str, want: Callable[[str], bool] = lambda _: True) -> set[str]:
    """Ids in the committed lines of all output files (of any writer) that ``want`` accepts."""
    done: set[str] = set()
    for name, size in committed_sizes(out_dir).items():
        with open(os.path.join(out_dir, name), "rb") as f:
            data = f.read(size)
        for line in data.splitlines():
            item_id = json.loads(line)["id"]
            if want(item_id):
                done.add(item_id)
    return done


def total_counts(out_dir: str) -> Counter:
    """Counts summed over every writer's committed progress (kept, filtered:<reason>, rejected:<reason>)."""
    total: Counter = Counter()
    for record in read_progress(out_dir).values():
        total.update(record.get("counts", {}))
    return total


class OutputWriter:
    """Appends one writer's lines batch by batch; ``commit`` makes a batch durable all at once."""

    def __init__(self, out_dir: str, writer: int, fsync: bool = True):
        self.out_dir = out_dir
        self.writer = writer
        self.fsync = fsync
        self.batches = 0
        previous = read_progress(out_dir).get(writer, {})
        self.counts: Counter = Counter(previous.get("counts", {}))
        self.files = {kind: open(os.path.join(out_dir, output_name(kind, writer)), "ab") for kind in OUTPUT_KINDS}
        self.progress_path = os.path.join(out_dir, progress_name(writer))

    def commit(self, lines: dict[str, list[dict]], counts: Counter) -> None:
        """Append ``lines`` (kind -> records) and record the new lengths and counts atomically."""
        for kind, records in lines.items():
            if records:
                self.files[kind].write(
                    b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
                )
        sizes = {}
        for kind, f in self.files.items():
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())  # the lines are on disk before the progress that counts them
            sizes[output_name(kind, self.writer)] = f.tell()
        self.batches += 1
        if os.environ.get(KILL_AT_ENV) == f"{self.writer}:{self.batches}":
            os.kill(os.getpid(), signal.SIGKILL)
        self.counts.update(counts)
        tmp = self.progress_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"files": sizes, "counts": dict(self.counts)}, f)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, self.progress_path)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
