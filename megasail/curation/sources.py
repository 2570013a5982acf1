"""Image sources for recaptioning: a directory tree, JSONL files with an ``image`` field, or webdataset tars.

Every image has a stable id that does not depend on the order of files or members:

| source | id | output ``image`` (relative to ``image_root``) |
| --- | --- | --- |
| directory (recursive) | its path relative to the directory | the same path |
| JSONL (``{"image": path, ...}``) | the record's ``id`` field, else its image path | the image path as given |
| tars (``'shards/*.tar'``) | ``SHARD#KEY`` (shard relative to the shards' directory, webdataset key) | ``SHARD#MEMBER`` |

Files are read as preprocessing reads them (``read_image_file``: regular files inside the image root,
under a byte cap), so an image recaptioning can read, ``tools/preprocess_data.py --image-root ROOT``
can read too. JSONL lines are streamed; tars are read as streams (``tarfile`` mode ``r|*``): image,
``.json`` and ``.txt`` members of the wanted keys are held in memory, nothing is extracted to disk,
and members of other keys are skipped undecoded.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from megasail.data.images.formats import DEFAULT_MAX_IMAGE_BYTES
from megasail.data.preprocess.records import read_image_file
from megasail.data.preprocess.rejects import RecordRejected
from megasail.data.preprocess.sources import IMAGE_EXTENSIONS, MAX_TEXT_MEMBER_BYTES, _wds_key
from megasail.inference.batched import ImageReadError

SOURCE_KINDS = ("dir", "jsonl", "tar")
# keys every output line sets itself; a source field of the same name is carried as "source_<key>"
OWN_KEYS = ("id", "image", "caption", "prompt_id", "model", "reason", "message")


class SourceError(ValueError):
    """A source that cannot be listed (missing, empty, ambiguous image root, duplicate ids)."""


@dataclass
class ImageRecord:
    """One image to caption. ``read()`` returns its encoded bytes (raises ImageReadError); a record
    that is broken itself (bad JSON line, no image field) has ``error`` = (reason, message) instead."""

    id: str
    image: str
    location: str  # for messages: a path, "file:line" or "shard:member"
    carried: dict = field(default_factory=dict)
    read: Callable[[], bytes] | None = None
    error: tuple[str, str] | None = None


def carry(fields: dict) -> dict:
    """Source fields as carried to the output: own keys renamed ``source_<key>``."""
    return {(f"source_{k}" if k in OWN_KEYS else k): v for k, v in fields.items()}


def _file_reader(root: str, name: str, max_bytes: int, where: str) -> Callable[[], bytes]:
    def read() -> bytes:
        try:
            return read_image_file(root, name, max_bytes, where)
        except RecordRejected as e:
            raise ImageReadError(e.reason, e.message) from None

    return read


class ImageSource:
    """``records(want)`` streams the records whose id ``want(id)`` accepts; ``ids(want)`` lists
    (id, location) of the same records cheaply (no image bytes read), for counting and checks."""

    kind: str
    image_root: str
    description: str

    def records(self, want: Callable[[str], bool]) -> Iterator[ImageRecord]:
        raise NotImplementedError

    def ids(self, want: Callable[[str], bool]) -> Iterator[tuple[str, str]] | None:
        for record in self.records(want):
            yield record.id, record.location


class DirectorySource(ImageSource):
    kind = "dir"

    def __init__(self, root: str, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.image_root = os.path.abspath(root)
        self.description = f"directory {self.image_root}"
        self.max_image_bytes = max_image_bytes

    def _names(self) -> Iterator[str]:
        for directory, dirs, files in os.walk(self.image_root):
            dirs.sort()  # a stable walk; the split itself does not depend on it
            for name in sorted(files):
                if name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                    yield os.path.relpath(os.path.join(directory, name), self.image_root).replace(os.sep, "/")

    def records(self, want):
        where = f"--images {self.image_root}"
        for name in self._names():
            if want(name):
                path = os.path.join(self.image_root, name)
                read = _file_reader(self.image_root, name, self.max_image_bytes, where)
                yield ImageRecord(name, name, path, read=read)

    def ids(self, want):
        for name in self._names():
            if want(name):
                yield name, os.path.join(self.image_root, name)


class JsonlSource(ImageSource):
    kind = "jsonl"

    def __init__(self, paths: list[str], image_root: str | None, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.paths = paths
        dirs = {os.path.dirname(p) for p in paths}
        if image_root is None and len(dirs) > 1:
            raise SourceError(
                f"JSONL inputs lie in {len(dirs)} directories ({', '.join(sorted(dirs)[:3])}, ...): "
                "pass --image-root, the directory their image paths are relative to"
            )
        self.image_root = os.path.abspath(image_root or dirs.pop())
        self.description = f"{len(paths)} JSONL file(s), images under {self.image_root}"
        self.max_image_bytes = max_image_bytes

    def _lines(self) -> Iterator[tuple[str, int, dict | None, str | None]]:
        """(path, line number, fields or None, why not) per non-blank line."""
        for path in self.paths:
            with open(path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        fields = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
                    except (ValueError, RecursionError) as e:
                        yield path, number, None, f"not JSON ({type(e).__name__}: {str(e)[:120]})"
                        continue
                    if not isinstance(fields, dict):
                        yield path, number, None, f"expected a JSON object, got {type(fields).__name__}"
                    elif not isinstance(fields.get("image"), str) or not fields["image"]:
                        yield path, number, fields, "no 'image' path (a non-empty string)"
                    else:
                        yield path, number, fields, None

    @staticmethod
    def _id(path: str, number: int, fields: dict | None) -> str:
        if fields is not None and isinstance(fields.get("id"), (str, int)) and not isinstance(fields["id"], bool):
            return str(fields["id"])
        if fields is not None and isinstance(fields.get("image"), str) and fields["image"]:
            return fields["image"]
        return f"{os.path.basename(path)}:{number}"  # a broken line: its place is its id

    def records(self, want):
        where = f"--image-root {self.image_root}"
        for path, number, fields, problem in self._lines():
            record_id = self._id(path, number, fields)
            if not want(record_id):
                continue
            location = f"{path}:{number}"
            if problem is not None:
                carried = carry({k: v for k, v in (fields or {}).items() if k != "image"})
                image = fields.get("image") if fields and isinstance(fields.get("image"), str) else None
                yield ImageRecord(record_id, image, location, carried,
                                  error=("malformed_record", f"{location}: {problem}"))  # fmt: skip
                continue
            name = fields["image"]
            carried = carry({k: v for k, v in fields.items() if k not in ("id", "image")})
            read = _file_reader(self.image_root, name, self.max_image_bytes, where)
            yield ImageRecord(record_id, name, location, carried, read=read)

    def ids(self, want):
        for path, number, fields, _ in self._lines():
            record_id = self._id(path, number, fields)
            if want(record_id):
                yield record_id, f"{path}:{number}"


class TarSource(ImageSource):
    """Webdataset shards: one record per key with an image member (the first one, by member order)."""

    kind = "tar"

    def __init__(self, paths: list[str], max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.paths = paths
        self.image_root = os.path.commonpath([os.path.dirname(p) for p in paths])
        self.description = f"{len(paths)} tar shard(s) under {self.image_root}"
        self.max_image_bytes = max_image_bytes

    def _shard(self, path: str) -> str:
        return os.path.relpath(path, self.image_root).replace(os.sep, "/")

    def records(self, want):
        for path in self.paths:
            yield from self._shard_records(path, want)

    def _shard_records(self, path: str, want) -> Iterator[ImageRecord]:
        shard = self._shard(path)
        key, members, wanted = None, {}, False

        def group() -> Iterator[ImageRecord]:
            if wanted:
                yield from self._group_record(path, shard, key, members)

        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue  # directories, links and devices are never followed
                    member_key, ext = _wds_key(member.name)
                    if member_key != key:
                        yield from group()
                        key, members = member_key, {}
                        wanted = want(f"{shard}#{key}")
                    if not wanted or (ext not in IMAGE_EXTENSIONS and ext not in ("json", "txt")):
                        continue  # skipped by the stream, never decoded
                    cap = self.max_image_bytes if ext in IMAGE_EXTENSIONS else MAX_TEXT_MEMBER_BYTES
                    data = tar.extractfile(member).read(cap + 1) if member.size <= cap else None
                    if data is not None and len(data) > cap:
                        data = None  # over its cap: never held
                    members.setdefault(ext, []).append((member.name, data))
        except (tarfile.TarError, OSError, EOFError) as e:
            if wanted and key is not None:  # the sample being read when the stream broke
                yield ImageRecord(f"{shard}#{key}", f"{shard}#{key}", f"{path}:{key}",
                                  error=("archive_corrupt", f"{path}: tar stream broken at {key!r}: {e}"))  # fmt: skip
            return
        yield from group()

    def _group_record(self, path, shard, key, members) -> Iterator[ImageRecord]:
        record_id = f"{shard}#{key}"
        images = [m for ext in IMAGE_EXTENSIONS for m in members.get(ext, [])]
        carried: dict = {}
        for _, data in members.get("json", [])[:1]:
            try:
                meta = json.loads(data.decode("utf-8")) if data is not None else None
            except (ValueError, RecursionError):
                meta = None
            if isinstance(meta, dict):
                carried.update(carry(meta))
        for _, data in members.get("txt", [])[:1]:
            if data is not None:
                carried["source_caption"] = data.decode("utf-8", errors="replace")
        if not images:
            if members:  # a key with metadata but no image: reported, not dropped
                yield ImageRecord(record_id, None, f"{path}:{key}", carried,
                                  error=("image_missing", f"{path}: key {key!r} has no image member"))  # fmt: skip
            return
        name, data = images[0]
        location = f"{path}:{name}"

        def read(data=data, name=name) -> bytes:
            if data is None:
                raise ImageReadError("image_too_large", f"{path}:{name}: member over --max-image-bytes")
            return data

        yield ImageRecord(record_id, f"{shard}#{name}", location, carried, read=read)

    def ids(self, want):
        for path in self.paths:
            shard = self._shard(path)
            seen = None
            try:
                with tarfile.open(path, "r:*") as tar:  # headers only: data members are seeked over
                    for member in tar:
                        key, _ = _wds_key(member.name)
                        if member.isfile() and key != seen:
                            seen = key
                            if want(f"{shard}#{key}"):
                                yield f"{shard}#{key}", f"{path}:{member.name}"
            except (tarfile.TarError, OSError, EOFError):
                continue  # counted as archive_corrupt while captioning


def open_source(spec: str, image_root: str | None = None, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> ImageSource:
    """The source ``--images`` names: a directory, JSONL file(s) or tar shard(s) (globs allowed)."""
    if os.path.isdir(spec):
        if image_root is not None:
            raise SourceError("--image-root is for JSONL sources; a directory source is its own image root")
        return DirectorySource(spec, max_image_bytes)
    paths = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    paths = [os.path.abspath(p) for p in paths]
    if not paths:
        raise SourceError(f"--images {spec!r} matches no file")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SourceError(f"--images {missing[0]}: no such file or directory")
    tars = [p for p in paths if ".tar" in os.path.basename(p)]
    if tars and len(tars) != len(paths):
        raise SourceError(f"--images {spec!r} mixes tar shards and other files; give one kind")
    if tars:
        return TarSource(paths, max_image_bytes)
    return JsonlSource(paths, image_root, max_image_bytes)
