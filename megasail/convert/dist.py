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

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        chunk = write_item.tensor_data.chunk
        tensor = self.make(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes))
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
        index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))
        return full[index].contiguous() if full.shape != tuple(sizes) else full

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
        "stage": None,
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


class DistSource:
    """Tensors of a torch_dist checkpoint by key, each read whole (any saved layout)."""

    def __init__(self, step: str):
        self.step = step
        self.metadata = dcp.FileSystemReader(step).read_metadata()
        self.tensors = {
            k: v
            for k, v in self.metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata) and not k.startswith(_NON_MODEL)
        }

    def read(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        out = {key: torch.empty(tuple(info.size), dtype=info.properties.dtype)}
        dcp.load(out, storage_reader=dcp.FileSystemReader(self.step), no_dist=True)
        return out[key]
