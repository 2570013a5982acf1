"""Save a run's checkpoint: ``dist_checkpointing.save`` (torch_dist) into a tmp dir, then publish.py.

All ranks write their shards into ROOT/iter_NNNNNNN.tmp; rank 0 then writes megasail.json, renames the
dir into place and points the marker at it (docs/checkpoints.md, "How a save is published"). On GPU the
shards may be written in the background (megatron-core's async strategy), published when the loop next
calls ``finalize_async_saves``.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

from megasail.checkpoint.compat import materialize_adam_state, seed_writer_results_queue
from megasail.checkpoint.layout import step_dir, tmp_dir
from megasail.checkpoint.meta import CheckpointMeta, utc_now
from megasail.checkpoint.publish import publish_step, start_tmp_dir
from megasail.checkpoint.sharded import (
    OPTIMIZER_SHARDING,
    any_rank,
    check_optimizer_sharding,
    content_metadata,
    current_layout,
    has_optimizer,
    model_sharded_state_dict,
    rng_sharded_object,
    sharding_metadata,
)

log = logging.getLogger(__name__)

# test hook: seconds to sleep after the shards are written, before publishing (kill -9 tests)
PAUSE_ENV = "MEGASAIL_CHECKPOINT_PAUSE_BEFORE_PUBLISH"

_async_queue = None  # megatron-core AsyncCallsQueue, created on the first async save


def _save_strategy():
    strategy = get_default_save_sharded_strategy("torch_dist")
    if parallel_state.get_data_parallel_world_size() > 1:
        # spread the writes of replicated tensors over the DP ranks, as Megatron-LM does by default
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
    return strategy


def save_checkpoint(
    root,
    iteration,
    model_chunks,
    optimizer=None,
    scheduler=None,
    *,
    meta: dict,
    keep_last=3,
    async_save=False,
    optimizer_sharding=OPTIMIZER_SHARDING,
) -> str:
    """Save a checkpoint of every rank's state to ROOT/iter_NNNNNNN (collective: call on all ranks).

    model_chunks: this rank's model chunks (megatron DDP-wrapped or not), one per virtual stage.
    optimizer: megatron optimizer (None on every rank: a weights-only checkpoint, "model" alone);
    scheduler: OptimizerParamScheduler.
    meta: JSON-serialisable run state for megasail.json (stage, loader_state, config, consumed ...);
    iteration, layout, format_version, weights_only, optimizer_sharding and saved_at are added here.
    keep_last: published step dirs kept after this one is published (<= 0 keeps all).
    async_save: on GPU, write the shards in the background (call ``finalize_async_saves`` every step
    and with blocking=True before exit); on CPU the save is synchronous.
    optimizer_sharding: the distributed optimizer's layout, one of OPTIMIZER_SHARDINGS: "dp_reshardable"
    (each DP rank writes its own shard; loads at any DP size, the same TP/PP/VPP) or "fully_reshardable"
    (gathered per parameter; loads at any layout).
    Returns the step dir (published on return when synchronous).
    """
    check_optimizer_sharding(optimizer_sharding)
    finalize_async_saves(blocking=True)  # one save in flight at a time; its .tmp dir must not be swept
    seed_writer_results_queue()
    rank = dist.get_rank()
    weights_only = not any_rank(has_optimizer(optimizer))
    final = step_dir(root, iteration)
    checkpoint_meta = CheckpointMeta(
        iteration=int(iteration),
        layout=current_layout(),
        weights_only=weights_only,
        optimizer_sharding=None if weights_only else optimizer_sharding,
        saved_at=utc_now(),
        run=dict(meta),
    )
    checkpoint_meta.dumps(final)  # not JSON-serialisable: raise before any rank writes
    if rank == 0:
        start_tmp_dir(root, iteration)
    dist.barrier()

    metadata = sharding_metadata(optimizer_sharding)
    state = {"model": model_sharded_state_dict(model_chunks, metadata)[0]}
    if not weights_only:  # a weights-only checkpoint holds "model" alone
        state["rng_state"] = rng_sharded_object()
        if has_optimizer(optimizer):
            materialize_adam_state(optimizer)
            state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=metadata)
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
    use_async = async_save and torch.cuda.is_available()
    if async_save and not use_async:
        log.info("checkpoint.async_save needs a GPU: saving synchronously")
    request = dist_checkpointing.save(
        state,
        tmp_dir(root, iteration),
        sharded_strategy=_save_strategy(),
        async_sharded_save=use_async,
        content_metadata=content_metadata(metadata),
    )

    def publish():
        pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
        if pause > 0:
            time.sleep(pause)
        if rank == 0:
            publish_step(root, checkpoint_meta, keep_last)
        dist.barrier()

    if use_async:
        global _async_queue
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        _async_queue = _async_queue or AsyncCallsQueue()
        request.add_finalize_fn(publish)
        _async_queue.schedule_async_request(request)
    else:
        publish()
    return final


def finalize_async_saves(blocking: bool = False) -> None:
    """Publish finished background saves (collective; a no-op without async saves)."""
    if _async_queue is not None:
        _async_queue.maybe_finalize_async_calls(blocking=blocking)
