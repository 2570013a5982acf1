"""The private torch and megatron-core APIs the checkpoint package relies on, each behind a function.

Written against torch 2.13.0 and megatron-core 0.16.1 (``megasail.versions.WRITTEN_FOR``); each
function checks that what it uses is there and otherwise raises ``PrivateAPIError`` with one line
naming the attribute, the version it was written for, the one installed and what to do.

- ``seed_writer_results_queue``: megatron's torch_dist writer hands results back through a queue served by
  a Manager process (``filesystem_async._results_queue``); it is seeded from a Manager of ours.
- ``torch_adam_load_fixes`` / ``materialize_adam_state``: two bugs of megatron's DistributedOptimizer
  loading on torch's Adam (the fallback without TE/apex, i.e. CPU runs), patched around its private
  ``_set_main_param_and_optimizer_states`` and ``model_param_group_index_map``.
- ``LOAD_ERRORS``: torch DCP's ``CheckpointException`` derives from BaseException, not Exception.
- ``torch_dist_strategy_parts``: the pieces of megatron's torch_dist save strategy the streaming writer
  (streaming.py) builds on, ``_replace_state_dict_keys_with_sharded_keys`` among them.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.distributed.checkpoint.api import CheckpointException

from megasail.versions import private_attr

USER = "megasail.checkpoint"
_PIN = "install megatron-core 0.16.1 (constraints-cpu.txt) or update megasail/checkpoint/compat.py"

# what a failed dist_checkpointing.load raises: DCP wraps the ranks' errors in a BaseException
LOAD_ERRORS = (Exception, CheckpointException)

_writer_manager = None  # the Manager process serving megatron's write-results queue


def _mcore(module, name: str, thing: str, what_to_do: str = _PIN):
    return private_attr(module, name, user=USER, library="megatron-core", thing=thing, what_to_do=what_to_do)


def seed_writer_results_queue() -> None:
    """Give megatron's torch_dist writer a results queue whose Manager process dies with this one.

    megatron spawns that Manager once (``filesystem_async._results_queue``, megatron-core 0.16); its
    process never watches its parent, so a trainer killed with SIGKILL left it running (~460 MB each),
    and a SIGTERM to the whole job killed it before the trainer's last save. Ours ignores stop signals
    and dies with this process. Idempotent.
    """
    global _writer_manager
    import multiprocessing
    import threading
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megasail.child_processes import worker_of

    queue = _mcore(
        filesystem_async,
        "_results_queue",
        "dist_checkpointing.strategies.filesystem_async._results_queue",
        "without it the writer's Manager process outlives a killed trainer; " + _PIN,
    )
    if _writer_manager is not None or queue is not None:
        return  # seeded already (by us, or megatron made its own before the first save)
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    main_thread = threading.current_thread() is threading.main_thread()  # the death signal follows the thread
    manager.start(initializer=worker_of, initargs=(os.getpid(), main_thread))  # lives through a SIGTERM too
    filesystem_async._results_queue = manager.Queue()
    _writer_manager = manager


def torch_adams(optimizer):
    """(megatron sub-optimizer, its torch Adam) pairs: the torch fallback used without TE/apex (CPU)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield sub, inner


def materialize_adam_state(optimizer) -> None:
    """Give a never-stepped torch Adam the state its first step would create (step 0, zero moments).

    megatron-core's distributed optimizer reads every parameter's "step" when it builds a state dict; on
    the torch fallback that state exists only after a first step. Equal to torch's lazy initialisation,
    so the next step is unchanged; parameters are not touched.
    """
    for _, inner in torch_adams(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p].update(
                        step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)
                    )


@contextlib.contextmanager
def torch_adam_load_fixes(optimizer):
    """Around ``optimizer.load_state_dict``: two megatron-core 0.16.1 bugs of the distributed optimizer on
    the torch Adam fallback.

    1. Loading the parameter state copies every key of a parameter's Adam state, "step" included, which
       the checkpoint keeps in param_groups instead: ``fully_reshardable`` has none (KeyError 'step'),
       ``dp_reshardable`` hands over the step the optimizer had before the load (an unsaved local value,
       0 in a fresh run). The step load_state_dict already restored is handed to that copy instead.
    2. load_state_dict gives every parameter the same "step" tensor; torch Adam increments it in place
       once per parameter, so the bias correction would run ahead: each parameter gets its own copy.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for sub, inner in torch_adams(optimizer):
        if not isinstance(sub, DistributedOptimizer):
            continue  # the non-distributed optimizers load Adam's state through torch's own load_state_dict
        original = _mcore(
            sub,
            "_set_main_param_and_optimizer_states",
            "DistributedOptimizer._set_main_param_and_optimizer_states",
        )
        _mcore(sub, "model_param_group_index_map", "DistributedOptimizer.model_param_group_index_map")

        def with_step(model_param, tensors, sub=sub, inner=inner, original=original):
            group_index, group_order = sub.model_param_group_index_map[model_param]
            state = inner.state[inner.param_groups[group_index]["params"][group_order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
            original(model_param, tensors)

        sub._set_main_param_and_optimizer_states = with_step
        patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            del sub._set_main_param_and_optimizer_states
    for _, inner in torch_adams(optimizer):
        for state in inner.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def torch_dist_strategy_parts():
    """(replace_keys, to_pyt_state_dict, MCoreSavePlanner, TorchDistSaveShardedStrategy) of megatron's
    torch_dist strategy module: what its save does, for a writer that makes tensors as they are written."""
    from megatron.core.dist_checkpointing.strategies import torch as torch_dist

    return (
        _mcore(
            torch_dist,
            "_replace_state_dict_keys_with_sharded_keys",
            "dist_checkpointing.strategies.torch._replace_state_dict_keys_with_sharded_keys",
        ),
        _mcore(
            torch_dist,
            "mcore_to_pyt_state_dict",
            "dist_checkpointing.strategies.torch.mcore_to_pyt_state_dict",
        ),
        _mcore(torch_dist, "MCoreSavePlanner", "dist_checkpointing.strategies.torch.MCoreSavePlanner"),
        _mcore(
            torch_dist,
            "TorchDistSaveShardedStrategy",
            "dist_checkpointing.strategies.torch.TorchDistSaveShardedStrategy",
        ),
    )
