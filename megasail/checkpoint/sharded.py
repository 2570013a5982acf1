"""Sharded state dicts: what each rank hands megatron-core's ``dist_checkpointing`` to save or load.

"model" is every virtual-pipeline chunk of this rank merged into one dict keyed by global checkpoint key
(Transformer Engine's names whichever layer spec ran); "rng_state" one ShardedObject per rank; the
optimizer's comes from megatron's own ``sharded_state_dict`` with ``sharding_metadata()``.

The distributed optimizer is saved in one of megatron-core's two layouts (OPTIMIZER_SHARDINGS):
``dp_reshardable`` (the default, as in Megatron-LM): every DP rank writes its own flat shard of the
optimizer buffers, in parallel and without gathering anything; a load may change the DP size but not
TP, PP or VPP (the buffers' layout is the model's at that layout). ``fully_reshardable``: the flat DP
shards are gathered into one tensor per parameter and state (optimizer.state.exp_avg.<model key>, shaped
and TP-sharded like the parameter), so the checkpoint reshards over TP, PP and DP. megatron-core 0.16.1
no longer saves its ``fully_sharded_model_space`` layout (flattened ShardedTensors were removed).
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

OPTIMIZER_SHARDINGS = ("dp_reshardable", "fully_reshardable")
OPTIMIZER_SHARDING = "fully_reshardable"  # the default keeps resume at any layout; dp_reshardable is opt-in


def unwrap(model):
    """The module inside megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def check_optimizer_sharding(optimizer_sharding: str) -> str:
    """``optimizer_sharding`` if it is one of OPTIMIZER_SHARDINGS, else ValueError naming the config key."""
    if optimizer_sharding not in OPTIMIZER_SHARDINGS:
        choices = ", ".join(OPTIMIZER_SHARDINGS)
        raise ValueError(f"checkpoint.optimizer_sharding={optimizer_sharding!r}: use one of {choices}")
    return optimizer_sharding


def sharding_metadata(optimizer_sharding: str = OPTIMIZER_SHARDING) -> dict:
    """What model and optimizer ``sharded_state_dict`` read (as Megatron-LM's training passes it).

    non_homogeneous_layers: one key per layer with its global number (language_model.decoder.layers.7.)
    instead of a stacked layer axis; chained_optim_avoid_prefix: no "chained_0." in optimizer keys.
    """
    return {
        "non_homogeneous_layers": True,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "distrib_optim_sharding_type": optimizer_sharding,
        # fully_reshardable only: on GPU gather the DP shards over gloo into host memory of DP rank 0 (the
        # full state of a TP/PP shard would not fit beside the model in GPU memory); CPU all-gathers
        "distrib_optim_fully_reshardable_mem_efficient": torch.cuda.is_available(),
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }


def content_metadata(metadata: dict) -> dict:
    """``sharding_metadata()`` as stored in common.pt's content_metadata (without the process group)."""
    return {k: v for k, v in metadata.items() if k != "dp_cp_group"}


def model_sharded_state_dict(model_chunks, metadata: dict | None = None) -> tuple[dict, list[dict]]:
    """(merged, per_chunk): the chunks' sharded state dicts, merged into one dict keyed by global
    checkpoint key, and each chunk's own (keyed by its local state-dict names, for load_state_dict)."""
    metadata = metadata or sharding_metadata()
    per_chunk = [unwrap(chunk).sharded_state_dict(metadata=metadata) for chunk in model_chunks]
    merged = {}
    for sd in per_chunk:
        for value in sd.values():
            if value.key in merged:
                raise RuntimeError(f"checkpoint key {value.key!r} is produced by two model chunks")
            merged[value.key] = value
    return merged, per_chunk


def current_layout() -> dict:
    """{"tp", "pp", "vpp", "dp"} of this run (megasail.json's ``layout``)."""
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def rng_sharded_object() -> ShardedObject:
    """This rank's RNG states (python, numpy, torch, CUDA and megatron's tracker) as one ShardedObject
    of a (pp, tp, dp) grid: restored only at the same layout, where resume is then bit exact."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        # on CPU the CPU backend points the tracker's "CUDA" states at the default generator
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    layout = current_layout()
    rank = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, (layout["pp"], layout["tp"], layout["dp"]), rank, replica_id=0)


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_sharded_object`` saved."""
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def has_optimizer(optimizer) -> bool:
    """Whether this rank's optimizer holds parameters (a pipeline stage whose layers are all frozen has
    a stub, or on the torch fallback an Adam with empty parameter groups: nothing to save or load)."""
    if optimizer is None or getattr(optimizer, "is_stub_optimizer", False):
        return False
    return any(len(group["params"]) > 0 for group in optimizer.param_groups)


def any_rank(flag: bool) -> bool:
    """``flag`` OR-ed over every rank (collective)."""
    t = torch.tensor([int(flag)], dtype=torch.int32, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
