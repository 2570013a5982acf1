"""Raw JSON records -> `Conversation` plus the bytes of its images.

Record kinds (auto-detected per record by their fields, or forced with --input-format):

- conversation: ``{"id", "image": path | [paths], "conversations": [{"from": "human"|"gpt"|"system", "value"}]}``
  (LLaVA / InternVL style; "user"/"assistant" are accepted as role names too)
- caption: ``{"image": path | [paths], "caption": str}`` or ``{"image", "text"}``
- text: ``{"text": str}``

Image paths are relative to --image-root (or to the JSONL file's directory when none is given) and
must stay inside it; ``SHARD.tar#MEMBER`` names a member of an uncompressed tar shard there
(``tar_members.py``); webdataset records carry their image bytes inline.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from megasail.data.images.formats import DEFAULT_MAX_IMAGE_BYTES
from megasail.data.preprocess.images import ValidatedImage, validate_image
from megasail.data.preprocess.rejects import RecordRejected
from megasail.data.preprocess.sources import RawRecord
from megasail.data.preprocess.tar_members import read_tar_member, split_member_name
from megasail.data.text.template import Conversation, Turn

_ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class ParsedRecord:
    conversation: Conversation
    images: list[ValidatedImage]


def detect_kind(fields: dict, input_format: str) -> str:
    """ "conversation", "caption" or "text" for one record."""
    if input_format in ("conversation", "caption", "text"):
        return input_format
    if "conversations" in fields:
        return "conversation"
    if "caption" in fields or ("image" in fields and "text" in fields):
        return "caption"
    if "text" in fields:
        return "text"
    raise RecordRejected("missing_field", "record has none of 'conversations', 'caption', 'text'")


def _string_field(fields: dict, key: str) -> str:
    if key not in fields:
        raise RecordRejected("missing_field", f"missing field {key!r}")
    value = fields[key]
    if not isinstance(value, str):
        raise RecordRejected(
            "malformed_record", f"field {key!r} must be a string, got {type(value).__name__}"
        )
    if "\x00" in value:
        raise RecordRejected("invalid_text", f"field {key!r} contains a NUL character")
    return value


def _image_names(fields: dict, required: bool) -> list[str]:
    value = fields.get("image")
    if value is None or value == []:
        if required:
            raise RecordRejected("missing_field", "missing field 'image'")
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise RecordRejected("malformed_record", "field 'image' must be a path or a list of paths")
    if any("\x00" in n for n in names):
        raise RecordRejected("malformed_record", "field 'image' holds a path with a NUL character")
    return names


def _conversation_turns(fields: dict) -> tuple[Turn, ...]:
    if "conversations" not in fields:
        raise RecordRejected("missing_field", "missing field 'conversations'")
    raw = fields["conversations"]
    if not isinstance(raw, list):
        raise RecordRejected("malformed_record", "field 'conversations' must be a list")
    if not raw:
        raise RecordRejected("empty_conversation", "field 'conversations' is empty")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RecordRejected("missing_field", f"conversations[{i}] needs 'from' and 'value'")
        role = _ROLE_NAMES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise RecordRejected(
                "malformed_record", f"conversations[{i}].from = {turn['from']!r} is not human/gpt/system"
            )
        if not isinstance(turn["value"], str):
            raise RecordRejected("malformed_record", f"conversations[{i}].value must be a string")
        if "\x00" in turn["value"]:
            raise RecordRejected("invalid_text", f"conversations[{i}].value contains a NUL character")
        turns.append(Turn(role, turn["value"]))
    return tuple(turns)


def _read_image(
    name: str, record: RawRecord, image_root: str | None, max_pixels: int, max_bytes: int
) -> ValidatedImage:
    if record.inline_images is not None:
        if name not in record.inline_images:
            raise RecordRejected("image_missing", f"image {name!r} is not a member of this sample")
        return validate_image(record.inline_images[name], name, max_pixels)
    source_file = record.location.rsplit(":", 1)[0]
    root = image_root if image_root is not None else os.path.dirname(source_file)
    where = f"--image-root {image_root}" if image_root is not None else f"the directory of {source_file}"
    data = read_image_file(root, name, max_bytes, where)
    return validate_image(data, name, max_pixels)


def read_image_file(root: str, name: str, max_bytes: int, where: str) -> bytes:
    """The bytes of `name` under `root`: a regular file inside realpath(root), at most `max_bytes`.

    Absolute names and names that resolve (via ../ or symlinks) outside the root are refused; the file
    is opened non-blocking (a FIFO cannot hang the worker) and must be a regular file (not /dev/zero).
    """
    if os.path.isabs(name):
        raise RecordRejected(
            "image_path_outside_root", f"image {name!r} is an absolute path; give it relative to {where}"
        )
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, name))
    if os.path.commonpath([real_root, path]) != real_root:
        raise RecordRejected("image_path_outside_root", f"image {name!r} leads outside {where}")
    member = split_member_name(name)
    if member is not None and not os.path.lexists(path):  # SHARD.tar#MEMBER (a file of that name wins)
        shard = os.path.realpath(os.path.join(real_root, member[0]))
        if os.path.commonpath([real_root, shard]) != real_root:
            raise RecordRejected("image_path_outside_root", f"image {name!r} leads outside {where}")
        return read_tar_member(shard, member[1], max_bytes, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise RecordRejected("image_missing", f"image {name!r} not found (relative to {where})") from None
    except OSError as e:
        raise RecordRejected(
            "image_unreadable", f"image {name!r} cannot be read: {e.strerror or e}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RecordRejected("image_unreadable", f"image {name!r} is not a regular file")
        if st.st_size > max_bytes:
            raise RecordRejected(
                "image_too_large", f"image {name!r} is {st.st_size} bytes > --max-image-bytes {max_bytes}"
            )
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)  # the file may have grown since fstat
    except OSError as e:
        raise RecordRejected(
            "image_unreadable", f"image {name!r} cannot be read: {e.strerror or e}"
        ) from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise RecordRejected("image_too_large", f"image {name!r} is over --max-image-bytes {max_bytes} bytes")
    return data


def parse_record(
    record: RawRecord,
    input_format: str,
    image_root: str | None,
    max_pixels: int,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> ParsedRecord:
    """The record as a Conversation with validated images; RecordRejected (message without location) if bad."""
    fields = record.fields
    kind = detect_kind(fields, input_format)
    if kind == "conversation":
        turns = _conversation_turns(fields)
        names = _image_names(fields, required=False)
        conv_kind = "chat"
    elif kind == "caption":
        caption = _string_field(fields, "caption" if "caption" in fields else "text")
        names = _image_names(fields, required=True)
        # An empty question: the caption template ignores it; a chat template puts the images there.
        turns = (Turn("user", ""), Turn("assistant", caption))
        conv_kind = "caption"
    else:
        turns = (Turn("assistant", _string_field(fields, "text")),)
        names = []
        conv_kind = "text"
    images = [_read_image(n, record, image_root, max_pixels, max_image_bytes) for n in names]
    return ParsedRecord(Conversation(turns, len(images), conv_kind), images)
