"""Inputs of a preprocessing run: which files, which work units, and the raw records each unit reads.

A work unit is a fixed chunk of one input: `lines_per_unit` lines of a JSONL file, or one whole tar
shard. Units depend only on the inputs and that number, never on the worker count, so each unit's
shard is the same bytes however many processes run, and a resumed run redoes exactly the missing ones.
Both containers are streamed: JSONL line by line from a byte offset, tars with `tarfile` in stream
mode (image, .json and .txt members are read into memory by key, each under a size cap, and never
extracted to disk; other members are skipped unread).
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from megasail.data.images.formats import DEFAULT_MAX_IMAGE_BYTES
from megasail.data.preprocess.rejects import RecordRejected

INPUT_FORMATS = ("auto", "conversation", "caption", "text", "webdataset")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_SCAN_BLOCK = 16 << 20


class InputError(ValueError):
    """An input that cannot be planned: missing, empty glob, or an unsupported container."""


@dataclass(frozen=True)
class InputFile:
    source_id: int  # index in the run's input list; stored per sample in the image sidecar
    path: str
    container: str  # "jsonl" or "tar"
    size: int


@dataclass(frozen=True)
class WorkUnit:
    index: int  # position in the merge order
    source_id: int
    path: str
    container: str
    start_byte: int
    end_byte: int  # exclusive; for tars the file size
    first_line: int  # 1-based line number of start_byte (JSONL)


@dataclass
class RawRecord:
    """One record before parsing: where it is, its fields (or why it has none), inline image bytes."""

    location: str  # "file:line" or "shard.tar:member"
    fields: dict | None
    error: RecordRejected | None = None
    inline_images: dict[str, bytes] | None = None  # webdataset: member name -> bytes


def expand_inputs(patterns: list[str], input_format: str) -> list[InputFile]:
    """Resolve files and globs in the order given (each glob sorted); duplicates keep their first place."""
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"--input {pattern!r} matches no file")
        for p in matches:
            p = os.path.abspath(p)
            if not os.path.isfile(p):
                raise InputError(f"--input {p}: no such file")
            if p not in paths:
                paths.append(p)
    return [InputFile(i, p, _container_of(p, input_format), os.path.getsize(p)) for i, p in enumerate(paths)]


def _container_of(path: str, input_format: str) -> str:
    if input_format == "webdataset":
        return "tar"
    if input_format == "auto" and (".tar" in os.path.basename(path) or tarfile.is_tarfile(path)):
        return "tar"
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        raise InputError(
            f"{path}: a JSON array is not streamed; convert it to JSON Lines first "
            f"(jq -c '.[]' {os.path.basename(path)} > {os.path.splitext(os.path.basename(path))[0]}.jsonl)"
        )
    return "jsonl"


def plan_units(inputs: list[InputFile], lines_per_unit: int) -> list[WorkUnit]:
    """Work units of all inputs, in input order then file order."""
    units: list[WorkUnit] = []
    for inp in inputs:
        if inp.container == "tar":
            spans = [(0, inp.size, 1)]
        else:
            spans = _jsonl_spans(inp.path, inp.size, lines_per_unit)
        for start, end, first_line in spans:
            units.append(WorkUnit(len(units), inp.source_id, inp.path, inp.container, start, end, first_line))
    return units


def _jsonl_spans(path: str, size: int, lines_per_unit: int) -> list[tuple[int, int, int]]:
    """Byte spans of every `lines_per_unit` lines, found with one vectorised newline scan."""
    boundaries = [0]
    lines_seen = 0
    with open(path, "rb") as f:
        offset = 0
        while block := f.read(_SCAN_BLOCK):
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            # Line number (1-based) each newline ends is lines_seen + k + 1; a span ends after each multiple.
            ends = newlines[(lines_seen + np.arange(1, len(newlines) + 1)) % lines_per_unit == 0]
            boundaries.extend(int(offset + e + 1) for e in ends)
            lines_seen += len(newlines)
            offset += len(block)
    if boundaries[-1] != size:
        boundaries.append(size)
    return [(boundaries[i], boundaries[i + 1], i * lines_per_unit + 1) for i in range(len(boundaries) - 1)]


class UnitReader:
    """The raw records of one unit, streamed; `bytes_read` tells how far into the unit it is (progress)."""

    def __init__(self, unit: WorkUnit, max_line_bytes: int, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.unit = unit
        self.max_line_bytes = max_line_bytes
        self.max_image_bytes = max_image_bytes
        self._file = None

    @property
    def bytes_read(self) -> int:
        if self._file is None:
            return 0
        if self._file.closed:
            return self.unit.end_byte - self.unit.start_byte
        return min(self._file.tell(), self.unit.end_byte) - self.unit.start_byte

    def __iter__(self) -> Iterator[RawRecord]:
        with open(self.unit.path, "rb") as f:
            self._file = f
            if self.unit.container == "tar":
                yield from _iter_tar(self.unit.path, f, self.max_image_bytes)
            else:
                yield from _iter_jsonl(self.unit, f, self.max_line_bytes)


def iter_unit_records(unit: WorkUnit, max_line_bytes: int) -> Iterator[RawRecord]:
    return iter(UnitReader(unit, max_line_bytes))


def _iter_jsonl(unit: WorkUnit, f, max_line_bytes: int) -> Iterator[RawRecord]:
    f.seek(unit.start_byte)
    line_no = unit.first_line
    while f.tell() < unit.end_byte:
        raw = f.readline(max_line_bytes + 1)
        location = f"{unit.path}:{line_no}"
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass  # skip the remainder of the over-long line without holding it
            yield RawRecord(
                location,
                None,
                RecordRejected(
                    "line_too_long", f"{location}: line longer than --max-line-bytes {max_line_bytes}"
                ),
            )
            line_no += 1
            continue
        encoding = "utf-8-sig" if line_no == 1 else "utf-8"  # tolerate a byte-order mark on line 1
        line_no += 1
        if not raw.strip():
            continue  # blank lines are not records
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as e:
            yield RawRecord(
                location, None, RecordRejected("invalid_utf8", f"{location}: invalid UTF-8 at byte {e.start}")
            )
            continue
        if "\x00" in text:
            yield RawRecord(
                location, None, RecordRejected("invalid_text", f"{location}: line contains a NUL byte")
            )
            continue
        try:
            fields = json.loads(text)
        except (ValueError, RecursionError) as e:  # also nesting too deep, integers too long
            yield RawRecord(location, None, RecordRejected("malformed_json", f"{location}: {_json_error(e)}"))
            continue
        if not isinstance(fields, dict):
            yield RawRecord(
                location,
                None,
                RecordRejected(
                    "malformed_json", f"{location}: expected a JSON object, got {type(fields).__name__}"
                ),
            )
            continue
        yield RawRecord(location, fields)


def _json_error(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at column {e.colno}"
    if isinstance(e, RecursionError):
        return "JSON nested too deeply"
    return f"{type(e).__name__}: {str(e)[:200]}"


MAX_TEXT_MEMBER_BYTES = 16 << 20  # cap on a webdataset .json/.txt member
_TEXT_EXTENSIONS = ("json", "txt")


def _wds_key(name: str) -> tuple[str, str]:
    """webdataset's split: key = path up to the first dot of the basename, extension = the rest."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def _iter_tar(path: str, fileobj, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Iterator[RawRecord]:
    """Only image, .json and .txt members are read (others are skipped unread), each under its cap."""

    def group_record(key: str, members: dict[str, tuple[str, bytes | None]]) -> RawRecord:
        images = {name: data for ext, (name, data) in members.items() if ext in IMAGE_EXTENSIONS}
        location = f"{path}:{next(iter(images), key)}"
        for ext, (name, data) in members.items():
            if data is None:  # over its cap: never read into memory
                cap = max_image_bytes if ext in IMAGE_EXTENSIONS else MAX_TEXT_MEMBER_BYTES
                return RawRecord(
                    location,
                    None,
                    RecordRejected(
                        "member_too_large",
                        f"{path}:{name}: member larger than "
                        + ("--max-image-bytes" if ext in IMAGE_EXTENSIONS else "the json/txt cap")
                        + f" {cap}",
                    ),
                )
        fields: dict = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"][1].decode("utf-8"))
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
                message = str(e) if isinstance(e, UnicodeDecodeError) else _json_error(e)
                return RawRecord(
                    location,
                    None,
                    RecordRejected("malformed_json", f"{path}:{members['json'][0]}: {message}"),
                )
            if isinstance(meta, dict):
                fields.update({k: meta[k] for k in ("conversations", "caption", "text") if k in meta})
        if "txt" in members:
            try:
                fields["caption"] = members["txt"][1].decode("utf-8")
            except UnicodeDecodeError as e:
                return RawRecord(
                    location,
                    None,
                    RecordRejected(
                        "invalid_utf8", f"{path}:{members['txt'][0]}: invalid UTF-8 at byte {e.start}"
                    ),
                )
        if "caption" in fields:
            fields.pop("text", None)  # the .txt caption wins over metadata text
        if images:
            fields["image"] = list(images)
        return RawRecord(location, fields, inline_images=images)

    current_key, members = None, {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue  # directories, links and devices are never followed
                key, ext = _wds_key(member.name)
                if key != current_key and members:
                    yield group_record(current_key, members)
                    members = {}
                current_key = key
                if ext in IMAGE_EXTENSIONS:
                    cap = max_image_bytes
                elif ext in _TEXT_EXTENSIONS:
                    cap = MAX_TEXT_MEMBER_BYTES
                else:
                    continue  # unused member (.mp4, .cls, ...): skipped by the stream, never held
                data = tar.extractfile(member).read(cap + 1) if member.size <= cap else None
                members[ext] = (member.name, data if data is None or len(data) <= cap else None)
    except (tarfile.TarError, OSError, EOFError) as e:
        members = {}  # the sample being read when the stream broke may be missing members: not written
        yield RawRecord(
            f"{path}:{current_key or 'header'}",
            None,
            RecordRejected("archive_corrupt", f"{path}: tar stream broken after member {current_key!r}: {e}"),
        )
    if members:
        yield group_record(current_key, members)
