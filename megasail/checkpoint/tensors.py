"""A torch_dist step dir's files read without a model or process group: whole tensors by key, whatever
layout (TP, PP, DP) saved them (``DistSource``), and shard files shorter than their metadata
(``short_shard_files``).

Both read torch DCP's ``.metadata`` (``FileSystemReader.read_metadata``): per key its global size and
chunks, per chunk the ``.distcp`` file, offset and length of its ``torch.save`` blob.
"""

from __future__ import annotations

import io
import os

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

_NON_MODEL = ("optimizer.", "rng_state", "chained_")  # chained_<i>.optimizer.: several optimizers


def short_shard_files(step: str) -> list[tuple[str, int, int]]:
    """(file, size, size the metadata needs) of every shard file of a step dir shorter than its metadata
    says (size -1: the file is missing); [] when all are whole (or the metadata itself cannot be read)."""
    try:
        metadata = dcp.FileSystemReader(step).read_metadata()
    except Exception:  # noqa: BLE001 - an unreadable .metadata is reported by the load itself
        return []
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    short = []
    for name, end in sorted(needed.items()):
        path = os.path.join(step, name)
        size = os.path.getsize(path) if os.path.exists(path) else -1
        if size < end:
            short.append((path, size, end))
    return short


class _FileSlice(io.RawIOBase):
    """Bytes [start, start + length) of an open file as a seekable file of its own."""

    def __init__(self, f, start: int, length: int):
        super().__init__()
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence]
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        got = self.f.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got


class DistSource:
    """Model tensors of a torch_dist checkpoint by key, each read whole (any saved layout).

    ``tensors``: {checkpoint key: DCP TensorStorageMetadata} of the model's tensors (optimizer state and
    RNG left out); ``read(key)`` -> the tensor at its global shape and stored dtype.

    Each saved chunk is a ``torch.save`` blob inside a ``.distcp`` file (the DCP metadata says
    where); it is unpickled straight from the file with the restricted unpickler, and a tensor
    saved in several chunks (TP/PP shards) is assembled in one buffer of its global shape. DCP's
    own reader would hold three copies of each chunk on the way (bytes, loaded tensor, target).
    """

    def __init__(self, step: str):
        self.step = step
        self.metadata = dcp.FileSystemReader(step).read_metadata()
        self.tensors = {
            k: v
            for k, v in self.metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata) and not k.startswith(_NON_MODEL)
        }
        self.where = {
            (i.fqn, tuple(i.offset)): info
            for i, info in self.metadata.storage_data.items()
            if i.offset is not None
        }

    def _chunk(self, key: str, offsets: tuple[int, ...]) -> torch.Tensor:
        info = self.where[(key, offsets)]
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{self.step}: '{key}' is stored with transforms {info.transform_descriptors}")
        with open(os.path.join(self.step, info.relative_path), "rb") as f:
            return torch.load(io.BufferedReader(_FileSlice(f, info.offset, info.length)), weights_only=True)

    def read(self, key: str) -> torch.Tensor:
        meta = self.tensors[key]
        size = tuple(meta.size)
        if len(meta.chunks) == 1 and tuple(meta.chunks[0].sizes) == size:
            return self._chunk(key, tuple(meta.chunks[0].offsets))
        out = torch.empty(size, dtype=meta.properties.dtype)
        for chunk in meta.chunks:
            part = self._chunk(key, tuple(chunk.offsets))
            out[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes, strict=True))] = part
            del part
        return out
