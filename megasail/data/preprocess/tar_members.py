"""Images named ``SHARD.tar#MEMBER``: a member of an uncompressed tar shard, read by name.

Recaptioning webdataset shards writes captions whose ``image`` names the member this way. A shard's
member index (name -> data offset, size) comes from its headers alone (``tarfile`` mode ``r:`` seeks
over the data) and is cached per process for the last few shards, so records of one shard cost one
header pass; each image is then one seek and one read of at most --max-image-bytes. Members are
never extracted to disk. Compressed shards (.tar.gz) have no random access and are refused.
"""

from __future__ import annotations

import functools
import os
import re
import tarfile

from megasail.data.preprocess.rejects import RecordRejected

# SHARD#MEMBER where SHARD is a tar (compressed ones are recognised, to be refused with a clear reason)
_MEMBER_NAME = re.compile(r"^(.+?\.(?:tar|tar\.gz|tgz|tar\.bz2|tar\.xz))#(.+)$")


def split_member_name(name: str) -> tuple[str, str] | None:
    """(shard path, member name) of ``SHARD.tar#MEMBER``, None for any other name."""
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2)) if match else None


@functools.lru_cache(maxsize=8)
def _member_index(path: str, mtime_ns: int, size: int) -> tuple[dict[str, tuple[int, int]], str | None]:
    """(member name -> (data offset, size), why the listing stopped early or None); keyed by the
    shard's mtime and size so a rewritten shard is read anew."""
    index: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile():
                    index.setdefault(member.name, (member.offset_data, member.size))
    except (tarfile.TarError, OSError, EOFError) as e:
        return index, f"{type(e).__name__}: {e}"
    return index, None


def read_tar_member(shard_path: str, member: str, max_bytes: int, name: str) -> bytes:
    """The bytes of ``member`` in the uncompressed tar at ``shard_path`` (``name`` for messages)."""
    try:
        st = os.stat(shard_path)
    except FileNotFoundError:
        raise RecordRejected("image_missing", f"image {name!r}: shard {shard_path} not found") from None
    except OSError as e:
        raise RecordRejected("image_unreadable", f"image {name!r}: shard cannot be read: {e.strerror or e}") from None
    if not os.path.isfile(shard_path):
        raise RecordRejected("image_unreadable", f"image {name!r}: shard {shard_path} is not a regular file")
    index, problem = _member_index(shard_path, st.st_mtime_ns, st.st_size)
    if member not in index:
        if problem is not None and not index:
            raise RecordRejected(
                "image_unreadable",
                f"image {name!r}: {shard_path} is not an uncompressed tar ({problem}); members are read by "
                "name from plain .tar shards only",
            )
        damaged = f" (the shard is damaged: {problem})" if problem else ""
        raise RecordRejected("image_missing", f"image {name!r}: no member {member!r} in {shard_path}{damaged}")
    offset, size = index[member]
    if size > max_bytes:
        raise RecordRejected("image_too_large", f"image {name!r} is {size} bytes > --max-image-bytes {max_bytes}")
    with open(shard_path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise RecordRejected("image_unreadable", f"image {name!r}: {shard_path} ends inside the member")
    return data
