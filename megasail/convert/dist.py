"""megasail torch_dist checkpoints, streamed tensor by tensor on one CPU process.

Keys and sharding come from the model itself: a TP=1/PP=1 ``SailVLModel`` is built on the meta
device (no memory) and ``megasail.training.checkpoint.model_sharded_state_dict`` gives its sharded
state dict exactly as training saves it (Transformer Engine key names, global layer numbers, SwiGLU
factories), so what is written here loads through ``load_checkpoint`` at any TP/PP/DP.

Writing: megatron-core's ``dist_checkpointing.save`` with its torch_dist strategy, except that the
tensors are made when the writer asks for them: the meta tensors only carry shapes through
planning, and ``_StreamingPlanner.resolve_data`` produces each one (torch DCP's ``FileSystemWriter``
with one thread writes them one at a time; megatron's async writer would stage them all in memory).
Reading: torch DCP loads one key at a time into a tensor of its global shape, whatever layout
(TP, PP, DP) saved it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Callable

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItemType

from megasail.models.config import ModelConfig

_NON_MODEL = ("optimizer.", "rng_state")


def meta_model(config: ModelConfig):
    """TP=1/PP=1 SailVLModel on the meta device (parameters have shapes, no storage).
    Needs megasail.runtime.initialize(1, 1) first (sharded state dicts read parallel_state)."""
    from megasail.models.sail_vl import SailVLModel

    with torch.device("meta"):
        return SailVLModel(config)


def checkpoint_names(model) -> tuple[dict[str, str], dict[str, tuple[int, ...]], dict]:
    """(checkpoint key -> TP=1 state-dict name, state-dict name -> shape, merged sharded state dict)."""
    from megasail.training.checkpoint import model_sharded_state_dict

    merged, per_chunk = model_sharded_state_dict([model])
    names, shapes = {}, {}
    for name, value in per_chunk[0].items():
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            names[value.key] = name
            shapes[name] = tuple(value.data.shape)
    return names, shapes, merged


class _StreamingPlanner(MCoreSavePlanner):
    """MCoreSavePlanner whose tensors are produced at write time by ``make(key, offsets, sizes)``."""

    def __init__(self, make, progress=None, **kwargs):
        super().__init__(**kwargs)
        self.make = make
        self.progress = progress
        self._written: torch.Tensor | None = None

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        if self._written is not None and self._written.untyped_storage().resizable():
            # DCP's writer keeps a reference to every tensor it wrote (for its safetensors format);
            # the previous one is in the file by now, so its memory is released here (tensors
            # that cannot be resized are file mappings of pickled inputs, not process memory)
            self._written.untyped_storage().resize_(0)
        chunk = write_item.tensor_data.chunk
        tensor = self.make(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes))
        self._written = tensor
        if self.progress is not None:
            self.progress.update(1)
        return tensor


class _StreamingStrategy(TorchDistSaveShardedStrategy):
    """torch_dist (same backend name and version, same files) written by torch DCP's serial writer."""

    def __init__(self, make, progress=None):
        super().__init__("torch_dist", 1, keep_only_main_replica=True, thread_count=1)
        self.make, self.progress = make, progress

    def save(self, sharded_state_dict, checkpoint_dir):
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt = mcore_to_pyt_state_dict(sharded_state_dict, False)
        writer = dcp.FileSystemWriter(
            str(checkpoint_dir), single_file_per_rank=True, thread_count=1, sync_files=True
        )
        planner = _StreamingPlanner(
            self.make, self.progress, dedup_replicated_tensors=False, flatten_state_dict=False
        )
        dcp.save(pyt, storage_writer=writer, planner=planner)


def write_weights_checkpoint(
    root: str, model, produce: Callable[[str], torch.Tensor], *, config_yaml: str, progress=None
) -> str:
    """Write ROOT/iter_0000000 (weights only, published like save_checkpoint) from ``produce(name)``
    (TP=1 state-dict name -> full tensor, made once per name, in the writer's order)."""
    from megasail.training import checkpoint as ckpt

    names, shapes, merged = checkpoint_names(model)
    dtypes = {names[v.key]: v.data.dtype for v in merged.values() if v.key in names}
    last: dict[str, torch.Tensor] = {}

    def make(key: str, offsets, sizes) -> torch.Tensor:
        name = names[key]
        if name not in last:
            last.clear()  # a SwiGLU fc1 is written as two chunks: keep its tensor for the second one
            tensor = produce(name)
            if tuple(tensor.shape) != shapes[name]:
                raise ValueError(
                    f"'{name}': produced shape {tuple(tensor.shape)}, the model needs {shapes[name]}"
                )
            last[name] = tensor.to(dtypes[name])
        full = last[name]
        if tuple(full.shape) == tuple(sizes):
            del last[name]  # written once: the writer releases it
            return full
        index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))
        return full[index].clone()  # own storage (a view would make the writer copy it)

    final = ckpt.step_dir(root, 0)
    tmp = final + ".tmp"
    os.makedirs(tmp, exist_ok=False)
    content = {k: v for k, v in ckpt.sharding_metadata().items() if k != "dp_cp_group"}
    try:
        dist_checkpointing.save(
            {"model": merged},
            tmp,
            sharded_strategy=_StreamingStrategy(make, progress),
            content_metadata=content,
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written step dir left behind
        raise
    meta = {
        "iteration": 0,
        "format_version": ckpt.FORMAT_VERSION,
        "weights_only": True,
        "optimizer_sharding": None,
        "layout": {"tp": 1, "pp": 1, "vpp": None, "dp": 1},
        "config": config_yaml,
        "stage": {
            "index": 0,
            "name": "converted",
        },  # a resume without weights_only reaches load_checkpoint's error
        "stage_start_step": 0,
        "stage_iteration": 0,
        "consumed_samples": 0,
        "consumed_tokens": 0,
        "converted_from": "huggingface",
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(os.path.join(tmp, ckpt.META), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.rename(tmp, final)
    with open(os.path.join(root, ckpt.MARKER), "w") as f:
        f.write("0\n")
    return final


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
    """Tensors of a torch_dist checkpoint by key, each read whole (any saved layout).

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
