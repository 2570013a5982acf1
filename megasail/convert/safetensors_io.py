"""Read and write safetensors checkpoints one tensor at a time (no mmap, no pickle).

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}`` and the raw little-endian bytes. Reading a tensor is one ``pread`` into a fresh
buffer, so memory holds only that tensor (a mapped shard would keep every page read so far
resident in this process). Writing plans every shard's header from the tensors' names, shapes and
dtypes first, then streams each tensor's bytes in order.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: str) -> tuple[dict[str, TensorEntry], dict]:
    """({name: entry}, __metadata__) of one .safetensors file; ValueError on a malformed header."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > os.path.getsize(path) - 8 or n > 1 << 30:
            raise ValueError(f"{path}: header length {n} is larger than the file")
        header = json.loads(f.read(n))
    base = 8 + n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(
            path, DTYPES[info["dtype"]], tuple(info["shape"]), base + begin, base + end
        )
    return entries, header.get("__metadata__") or {}


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """The tensor's bytes read into a new tensor (nothing else of the file stays in memory)."""
    out = torch.empty(entry.shape, dtype=entry.dtype)
    nbytes = entry.end - entry.start
    if out.numel() * out.element_size() != nbytes:
        raise ValueError(
            f"{entry.file}: {entry.shape} {entry.dtype} needs {out.numel() * out.element_size()} bytes, "
            f"the header gives {nbytes}"
        )
    if nbytes:
        # a buffer over the tensor's own memory (.numpy() would pin the storage's size for good)
        view = memoryview((ctypes.c_char * nbytes).from_address(out.data_ptr())).cast("B")
        with open(entry.file, "rb", buffering=0) as f:
            f.seek(entry.start)
            got = f.readinto(view)
        if got != nbytes:
            raise ValueError(f"{entry.file}: truncated at tensor bytes {entry.start}..{entry.end}")
    return out


def index_directory(directory: str, allow_pickle: bool = False) -> dict[str, TensorEntry]:
    """{tensor name: entry} of a HuggingFace weights directory (sharded with an index json, or not).

    Pickled ``*.bin`` / ``*.pt`` weights are refused unless ``allow_pickle`` (then loaded with
    ``torch.load(weights_only=True)``, whole files at a time, through ``load_pickled``).
    """
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        pickled = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth")))
        if pickled and not allow_pickle:
            raise ValueError(
                f"{directory}: only pickled weights ({', '.join(pickled[:3])}); unpickling can run "
                "code, so they are refused: convert them to safetensors, or pass --allow-pickle"
            )
        if not pickled:
            raise FileNotFoundError(f"{directory}: no *.safetensors weights")
        return {}
    entries: dict[str, TensorEntry] = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{index_path} names {name}, which does not exist")
        found, _ = read_header(path)
        for key, entry in found.items():
            if key in entries:
                raise ValueError(f"tensor '{key}' is in both {entries[key].file} and {path}")
            entries[key] = entry
    return entries


def load_pickled(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.bin`` files (only after --allow-pickle; restricted unpickler)."""
    state = {}
    for name in sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth"))):
        state.update(
            torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True, mmap=True)
        )
    return state


def plan_shards(
    tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """Split tensors, in order, into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape, dtype in tensors:
        nbytes = _nbytes(shape, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype))
        size += nbytes
    return [s for s in shards if s]


def _nbytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def write_sharded(
    directory: str,
    shards,
    produce: Callable[[str], torch.Tensor],
    metadata: dict | None = None,
    progress=None,
) -> list[str]:
    """Write ``shards`` (from ``plan_shards``) as model-0000i-of-0000n.safetensors (or
    model.safetensors when there is one) plus the index json, calling ``produce(name)`` for each
    tensor in order; a produced tensor whose shape or dtype differs from the plan is an error."""
    os.makedirs(directory, exist_ok=True)
    n = len(shards)
    names = (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards, strict=True):
        header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
        for name, shape, dtype in shard:
            nbytes = _nbytes(shape, dtype)
            header[name] = {
                "dtype": NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[name] = file_name
        total += offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
        tmp = os.path.join(directory, file_name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, shape, dtype in shard:
                tensor = produce(name)
                if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                    raise ValueError(
                        f"'{name}': produced {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}"
                    )
                f.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))  # no copy
                if progress is not None:
                    progress.update(1)
        os.replace(tmp, os.path.join(directory, file_name))
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return names
