"""Which data-parallel rank captions an image, and which prompt it gets: both from its id alone.

Hashes are BLAKE2b of the id's UTF-8 bytes, each use under its own ``person`` tag, so the rank an
image lands on tells nothing about its prompt. Python's ``hash()`` is salted per process and would
give each rank (and each resumed run) another split.
"""

from __future__ import annotations

import hashlib

_SCALE = float(1 << 64)


def id_hash(item_id: str, purpose: bytes, seed: int = 0) -> int:
    """A 64-bit integer from (id, purpose, seed); the same on every machine and run."""
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8, person=purpose[:16], salt=(seed % (1 << 128)).to_bytes(16, "little"))
    return int.from_bytes(digest.digest(), "little")


def shard_of(item_id: str, num_shards: int) -> int:
    """The data-parallel rank (0 .. num_shards-1) that captions ``item_id``; every id has exactly one."""
    return id_hash(item_id, b"megasail.split") % num_shards


def unit_draw(item_id: str, seed: int, purpose: bytes = b"megasail.prompt") -> float:
    """A number in [0, 1), uniform over ids, fixed by (id, seed)."""
    return id_hash(item_id, purpose, seed) / _SCALE
