"""A torch_dist checkpoint written on one process with each tensor made when the writer asks for it.

megatron-core's ``dist_checkpointing.save`` with its torch_dist strategy, except that the sharded state
dict's tensors (meta tensors: shapes only) are produced at write time by ``make(key, offsets, sizes)``
in ``_StreamingPlanner.resolve_data``; torch DCP's ``FileSystemWriter`` with one thread writes them one
at a time, so memory holds one tensor, not the model (megatron's async writer would stage them all).
The result is published like a training save (publish.py) and loads at any TP/PP/DP.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import torch
from megatron.core import dist_checkpointing
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.planner import WriteItemType

from megasail.checkpoint.compat import torch_dist_strategy_parts
from megasail.checkpoint.meta import CheckpointMeta
from megasail.checkpoint.publish import publish_step, start_tmp_dir
from megasail.checkpoint.sharded import content_metadata, sharding_metadata

_replace_keys, _to_pyt_state_dict, _MCoreSavePlanner, _TorchDistSaveShardedStrategy = (
    torch_dist_strategy_parts()
)

MakeTensor = Callable[[str, tuple, tuple], torch.Tensor]  # (key, chunk offsets, chunk sizes) -> the chunk


class _StreamingPlanner(_MCoreSavePlanner):
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


class _StreamingStrategy(_TorchDistSaveShardedStrategy):
    """torch_dist (same backend name and version, same files) written by torch DCP's serial writer."""

    def __init__(self, make, progress=None):
        super().__init__("torch_dist", 1, keep_only_main_replica=True, thread_count=1)
        self.make, self.progress = make, progress

    def save(self, sharded_state_dict, checkpoint_dir):
        sharded_state_dict, _, _ = _replace_keys(sharded_state_dict, True)
        pyt = _to_pyt_state_dict(sharded_state_dict, False)
        writer = dcp.FileSystemWriter(
            str(checkpoint_dir), single_file_per_rank=True, thread_count=1, sync_files=True
        )
        planner = _StreamingPlanner(
            self.make, self.progress, dedup_replicated_tensors=False, flatten_state_dict=False
        )
        dcp.save(pyt, storage_writer=writer, planner=planner)


def save_streamed(
    root: str, sharded_model: dict, make: MakeTensor, meta: CheckpointMeta, progress=None
) -> str:
    """Write ROOT/iter_NNNNNNN (NNNNNNN = meta.iteration) holding "model" = ``sharded_model`` (a merged
    model sharded state dict, e.g. of a meta-device model), its tensors from ``make``, then publish it
    with ``meta``. One process, after ``megasail.runtime.initialize(1, 1)``; progress: a tqdm bar
    updated once per tensor chunk written. Returns the step dir; no tmp dir is left behind on failure."""
    tmp = start_tmp_dir(root, meta.iteration)
    try:
        dist_checkpointing.save(
            {"model": sharded_model},
            tmp,
            sharded_strategy=_StreamingStrategy(make, progress),
            content_metadata=content_metadata(sharding_metadata()),
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written step dir left behind
        raise
    return publish_step(root, meta, keep_last=0)
