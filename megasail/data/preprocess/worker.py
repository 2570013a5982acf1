"""One work unit -> one finished shard, its rejects and its report; the same bytes in any process, any run.

A unit is done iff its report exists (renamed into place last). Each record is written, rejected
(bad input) or, when megasail itself raises on it, kept in the report's "internal_errors" with its
traceback. Why shards are not fsynced and when --resume trusts them: docs/preprocessing.md.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from megasail.data.preprocess.config import PreprocessConfig
from megasail.data.preprocess.records import parse_record
from megasail.data.preprocess.rejects import RecordRejected
from megasail.data.preprocess.samples import encode_sample
from megasail.data.preprocess.sources import UnitReader, WorkUnit
from megasail.data.preprocess.writer import open_shard_writer, write_sample
from megasail.data.text.template import get_template
from megasail.data.text.tokenizer import MultimodalTokenizer

log = logging.getLogger(__name__)

# Test hook: seconds to sleep before each unit finalizes, so a test can kill a run mid-way.
UNIT_DELAY_ENV = "MEGASAIL_PREPROCESS_UNIT_DELAY"


@dataclass(frozen=True)
class UnitContext:
    config: PreprocessConfig
    tokenizer: MultimodalTokenizer
    parts_dir: str


def unit_prefix(parts_dir: str, unit: WorkUnit) -> str:
    return os.path.join(parts_dir, f"unit-{unit.index:07d}")


def report_path(parts_dir: str, unit: WorkUnit) -> str:
    return unit_prefix(parts_dir, unit) + ".report.json"


# The files of a finished unit besides its report (the shard, then its rejects).
UNIT_FILE_SUFFIXES = (".bin", ".idx", ".img.bin", ".img.idx", ".rejects.jsonl")

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str | None:
    """This kernel boot's id (Linux), None where there is none."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip() or None
    except (OSError, ValueError):
        return None


def load_report(parts_dir: str, unit: WorkUnit) -> dict | None:
    """The unit's report if the unit can be trusted as finished, else None (the unit is redone)."""
    try:
        with open(report_path(parts_dir, unit), encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError):  # missing, unreadable or torn (e.g. after a power loss): redo the unit
        return None
    if not isinstance(report, dict) or report.get("unit") != unit.index:
        return None
    if report.get("internal_errors"):
        return None  # records hit a bug: redo the unit, so a fixed megasail resumes into a clean result
    prefix = unit_prefix(parts_dir, unit)
    if not all(os.path.isfile(prefix + suffix) for suffix in UNIT_FILE_SUFFIXES):
        return None  # a shard file was removed after the report was written: redo the unit
    unsynced_boot = report.get("unsynced_boot_id")
    if unsynced_boot is not None and unsynced_boot != boot_id():
        return None  # shard not fsynced and the machine rebooted since: it may be torn, redo it
    return report


def _write_atomic(path: str, text: str) -> None:
    # No fsync: a report lost to a power cut only means the unit is redone (load_report treats an
    # unreadable report as missing, and one of an un-synced shard from another boot too).
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


PROGRESS_EVERY = 16  # records between progress callbacks
MAX_TRACEBACK_CHARS = 20_000


def internal_error_entry(unit: WorkUnit, location: str, error: Exception) -> dict:
    """An exception megasail raised on one record: where, what, and the traceback (its last part)."""
    return {
        "source": unit.path,
        "location": location,
        "error": f"{type(error).__name__}: {str(error)[:1000]}",
        "traceback": "".join(traceback.format_exception(error))[-MAX_TRACEBACK_CHARS:],
    }


def process_unit(
    unit: WorkUnit, ctx: UnitContext, progress: Callable[[int, int], None] | None = None
) -> dict:
    """Read, validate, encode and write every record of `unit`; return its report (also saved).

    `progress(records, bytes)` is called with increments as the unit advances; over the whole unit
    they add up to its record count and its byte span.
    """
    cfg = ctx.config
    prefix = unit_prefix(ctx.parts_dir, unit)
    templates = {
        "chat": get_template(cfg.template),
        "caption": get_template(cfg.caption_template),
        "text": get_template("text"),
    }
    rejects: list[str] = []
    internal_errors: list[dict] = []
    reasons: Counter[str] = Counter()
    stats = Counter()
    started = time.perf_counter()
    writer_seconds = 0.0
    for leftover in glob.glob(glob.escape(prefix) + ".*"):
        os.remove(leftover)  # files of an attempt killed mid-unit
    # No fsync unless asked for (or no boot id can tell a reboot apart): see the module docstring.
    unsynced_boot = None if cfg.fsync_units else boot_id()
    writer = open_shard_writer(prefix, cfg.writer, sync=unsynced_boot is None)
    reader = UnitReader(unit, cfg.max_line_bytes, cfg.max_image_bytes)
    reported_records = reported_bytes = 0
    try:
        for record in reader:
            stats["read"] += 1
            if progress is not None and stats["read"] - reported_records >= PROGRESS_EVERY:
                progress(stats["read"] - reported_records, reader.bytes_read - reported_bytes)
                reported_records, reported_bytes = stats["read"], reader.bytes_read
            try:
                sample = _encode_record(record, ctx, templates)
            except RecordRejected as e:
                reasons[e.reason] += 1
                rejects.append(_reject_line(unit, record, e))
                continue
            except Exception as e:  # noqa: BLE001 - a bug in megasail, not bad input: reported apart from the rejects
                log.error("%s: internal error on this record", record.location, exc_info=e)
                internal_errors.append(internal_error_entry(unit, record.location, e))
                continue
            t0 = time.perf_counter()
            write_sample(writer, sample, unit.source_id)
            writer_seconds += time.perf_counter() - t0
            _count_written(stats, sample)
        if delay := float(os.environ.get(UNIT_DELAY_ENV, "0") or 0):
            time.sleep(delay)
        t0 = time.perf_counter()
        writer.finalize()
        writer_seconds += time.perf_counter() - t0
    except BaseException:
        writer.abort()
        raise
    if progress is not None:
        progress(stats["read"] - reported_records, unit.end_byte - unit.start_byte - reported_bytes)
    _write_atomic(prefix + ".rejects.jsonl", "".join(line + "\n" for line in rejects))
    report = {
        "unit": unit.index,
        "source_id": unit.source_id,
        "read": stats["read"],
        "written": stats["written"],
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "internal_errors": internal_errors,
        "counts": {k: stats[k] for k in WRITTEN_COUNTS},
        "input_bytes": unit.end_byte - unit.start_byte,
        "seconds": time.perf_counter() - started,
        "writer_seconds": writer_seconds,
        "unsynced_boot_id": unsynced_boot,  # None: the shard was fsynced
    }
    _write_atomic(report_path(ctx.parts_dir, unit), json.dumps(report, sort_keys=True))
    return report


def _encode_record(record, ctx: UnitContext, templates: dict):
    """One record -> its EncodedSample; raises RecordRejected (bad input) with the reason."""
    cfg = ctx.config
    if record.error is not None:
        raise record.error
    parsed = parse_record(record, cfg.input_format, cfg.image_root, cfg.max_image_pixels, cfg.max_image_bytes)
    return encode_sample(
        parsed,
        templates[parsed.conversation.kind],
        ctx.tokenizer,
        max_tiles=cfg.max_tiles,
        max_seq_length=cfg.max_seq_length,
        on_too_long=cfg.on_too_long,
        system_message=cfg.system_message,
    )


def _reject_line(unit: WorkUnit, record, e: RecordRejected) -> str:
    """The PREFIX.rejects.jsonl line of a rejected record: source, location, reason, message (and id)."""
    message = e.message if e.message.startswith(record.location) else f"{record.location}: {e.message}"
    entry = {"source": unit.path, "location": record.location, "reason": e.reason, "message": message}
    if isinstance(record.fields, dict) and isinstance(record.fields.get("id"), (str, int)):
        entry["id"] = record.fields["id"]  # the record's own id, when it has one
    return json.dumps(entry, ensure_ascii=False)


# what the report's "counts" add up over the written samples
WRITTEN_COUNTS = (
    "truncated", "images", "reencoded_images", "text_tokens", "target_tokens", "image_tokens", "image_bytes"
)


def _count_written(stats: Counter, sample) -> None:
    """Add one written sample to the unit's counts."""
    stats["written"] += 1
    stats["truncated"] += int(sample.truncated)
    stats["images"] += len(sample.images)
    stats["text_tokens"] += sample.text_tokens
    stats["target_tokens"] += sample.target_tokens
    stats["image_tokens"] += sample.image_tokens
    stats["image_bytes"] += sum(len(im.data) for im in sample.images)
    stats["reencoded_images"] += sum(im.source_format not in ("JPEG", "MPO", "PNG") for im in sample.images)
