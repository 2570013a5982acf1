"""Distributed checkpoints: megatron-core ``dist_checkpointing`` (torch_dist) with atomic publishing.

Layout (docs/checkpoints.md has every key)::

    ROOT/latest_checkpointed_iteration.txt   "12": written last, by rename
    ROOT/iter_0000012/                       renamed from iter_0000012.tmp once complete
        .metadata, __*_*.distcp, common.pt, metadata.json    (dist_checkpointing, torch_dist)
        megasail.json                                         (iteration, stage, loader state, config, layout)

The sharded state dict holds "model" (every virtual-pipeline chunk of this rank merged into one dict
keyed by global checkpoint key), "optimizer" (megatron's sharded optimizer state), "rng_state" (one
ShardedObject per rank) and "scheduler" (plain, saved once by rank 0). Keys are Transformer Engine's
whichever layer spec ran.

The distributed optimizer is saved ``fully_reshardable``: its flat DP shards are gathered into one
tensor per parameter and state (optimizer.state.exp_avg.<model key>, shaped and TP-sharded like the
parameter), so a checkpoint reshards over TP, PP and DP. megatron-core 0.16.1 no longer saves its
``fully_sharded_model_space`` layout (flattened ShardedTensors were removed) but still loads it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject, ShardedTensorFactory
from megatron.core.dist_checkpointing.serialization import (
    get_default_save_sharded_strategy,
    load_sharded_metadata,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "latest_checkpointed_iteration.txt"
META = "megasail.json"
OPTIMIZER_SHARDING = "fully_reshardable"  # per-parameter tensors: reshardable over TP, PP and DP
# test hook: seconds to sleep after the shards are written, before publishing (kill -9 tests)
PAUSE_ENV = "MEGASAIL_CHECKPOINT_PAUSE_BEFORE_PUBLISH"
_STEP_DIR = re.compile(r"^iter_(\d{7,})$")
_NON_MODEL_PREFIXES = ("optimizer.", "rng_state")
_MAX_LISTED = 20


class CheckpointError(Exception):
    """A checkpoint that cannot be used as asked; the message says which, why, and what to do."""


class CheckpointMismatchError(CheckpointError, KeyError):
    """The checkpoint's keys or shapes differ from the model's (the message lists them, one per line)."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would print the repr, newlines escaped


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is shorter than its metadata says (a copy or a write cut short)."""


_async_queue = None  # megatron-core AsyncCallsQueue, created on the first async save
_writer_manager = None  # the Manager process serving megatron's write-results queue (see below)


def _writer_queue_dies_with_this_process() -> None:
    """megatron's torch_dist writer hands its results back through a queue served by a Manager process it
    spawns once (``filesystem_async._results_queue``, megatron-core 0.16); that process never watches its
    parent, so a trainer killed with SIGKILL left it running (~460 MB each), and a SIGTERM to the whole job
    killed it before the trainer's last save. Seed the queue first, from a Manager whose process ignores
    stop signals and dies with this one."""
    global _writer_manager
    import multiprocessing
    import threading
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megasail.child_processes import worker_of

    if _writer_manager is not None or getattr(filesystem_async, "_results_queue", 0) is not None:
        return  # seeded already, or a megatron-core without this queue: nothing to do
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    main_thread = threading.current_thread() is threading.main_thread()  # the death signal follows the thread
    manager.start(initializer=worker_of, initargs=(os.getpid(), main_thread))  # lives through a SIGTERM too
    filesystem_async._results_queue = manager.Queue()
    _writer_manager = manager


def step_dir(root: str, iteration: int) -> str:
    """ROOT/iter_0000012 for iteration 12 (Megatron-LM's naming)."""
    return os.path.join(root, f"iter_{iteration:07d}")


def _is_step_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))


def _published_steps(root: str) -> list[tuple[int, str]]:
    """(iteration, path) of every published step dir under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and _is_step_dir(os.path.join(root, name)):
            found.append((int(m[1]), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    """The step dir the marker names (ROOT itself when it is a step dir); None when ROOT has none.

    Without a marker (a first save killed between publishing and writing it), or when the marked dir
    is gone (deleted by hand, or a re-save of the same iteration killed between its two renames), the
    newest published step dir is returned: a published dir is always complete.
    """
    if _is_step_dir(root):
        return root
    marker = os.path.join(root, MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            text = f.read().strip()
        if not text.isdigit():
            raise ValueError(f"{marker}: expected an iteration number, found {text[:80]!r}")
        path = step_dir(root, int(text))
        if _is_step_dir(path):
            return path
        log.warning(
            "%s names iteration %s but %s does not exist: using the newest published step dir",
            marker,
            text,
            os.path.join(path, META),
        )
    steps = _published_steps(root)
    return steps[-1][1] if steps else None


def _marked_iteration(root: str) -> int | None:
    """The iteration the marker names, or None without a (readable) marker."""
    try:
        with open(os.path.join(root, MARKER)) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def steps_after(root: str, iteration: int) -> list[int]:
    """Published iterations under ``root`` later than ``iteration`` (the marker's included)."""
    later = {it for it, _ in _published_steps(root) if it > iteration}
    marked = _marked_iteration(root) if os.path.isdir(root) else None
    if marked is not None and marked > iteration:
        later.add(marked)
    return sorted(later)


def supersede(root: str) -> str | None:
    """Move every step dir and the marker of ``root`` into ROOT/superseded_<UTC time>/ (rank 0), so a run
    can start over in the directory without deleting what was there; returns that dir (None if empty)."""
    names = [n for n in os.listdir(root) if _STEP_DIR.match(n) or n == MARKER] if os.path.isdir(root) else []
    if not names:
        return None
    aside = os.path.join(root, "superseded_" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    os.makedirs(aside, exist_ok=True)
    for name in sorted(names, key=lambda n: n == MARKER, reverse=True):  # the marker first
        os.rename(os.path.join(root, name), os.path.join(aside, name))
    _fsync_dir(root)
    return aside


def read_meta(path: str) -> dict:
    """megasail.json of a step dir, or of the latest checkpoint under a checkpoint root."""
    step = latest_checkpoint(path)
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {path} (no {MARKER} and no iter_* dir with {META})")
    with open(os.path.join(step, META)) as f:
        return json.load(f)


# --- sharded state dicts -------------------------------------------------------------------------


def _unwrap(model):
    while hasattr(model, "module"):  # megatron DDP / Float16Module
        model = model.module
    return model


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
        # on GPU gather the DP shards over gloo into host memory of DP rank 0 (the full state of a
        # TP/PP shard would not fit beside the model in GPU memory); CPU runs all-gather over gloo anyway
        "distrib_optim_fully_reshardable_mem_efficient": torch.cuda.is_available(),
        "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True),
    }


def model_sharded_state_dict(model_chunks, metadata: dict | None = None) -> tuple[dict, list[dict]]:
    """(merged, per_chunk): the chunks' sharded state dicts, merged into one dict keyed by global
    checkpoint key, and each chunk's own (keyed by its local state-dict names, for load_state_dict)."""
    metadata = metadata or sharding_metadata()
    per_chunk = [_unwrap(chunk).sharded_state_dict(metadata=metadata) for chunk in model_chunks]
    merged = {}
    for sd in per_chunk:
        for value in sd.values():
            if value.key in merged:
                raise RuntimeError(f"checkpoint key {value.key!r} is produced by two model chunks")
            merged[value.key] = value
    return merged, per_chunk


def _layout() -> dict:
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
    layout = _layout()
    rank = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
    )
    return ShardedObject("rng_state", state, (layout["pp"], layout["tp"], layout["dp"]), rank, replica_id=0)


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _has_optimizer(optimizer) -> bool:
    """Whether this rank's optimizer holds parameters (a pipeline stage whose layers are all frozen has
    a stub, or on the torch fallback an Adam with empty parameter groups: nothing to save or load)."""
    if optimizer is None or getattr(optimizer, "is_stub_optimizer", False):
        return False
    return any(len(group["params"]) > 0 for group in optimizer.param_groups)


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([int(flag)], dtype=torch.int32, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _materialize_adam_state(optimizer) -> None:
    """Give a never-stepped torch Adam the state its first step would create (step 0, zero moments).

    megatron-core's distributed optimizer reads every parameter's "step" when it builds a state dict; on
    the torch fallback (no TE/apex fused Adam: CPU runs) that state exists only after a first step.
    Equal to torch's lazy initialisation, so the next step is unchanged; parameters are not touched.
    """
    for _, inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p].update(
                        step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p)
                    )


def _torch_adams(optimizer):
    """(megatron sub-optimizer, its torch Adam) pairs: the torch fallback used without TE/apex (CPU)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield sub, inner


@contextlib.contextmanager
def _torch_adam_load_fixes(optimizer):
    """Work around two megatron-core 0.16.1 bugs of the distributed optimizer on the torch Adam fallback.

    1. ``fully_reshardable`` loading copies every key of a parameter's Adam state from the checkpoint,
       "step" included, which the checkpoint keeps in param_groups instead (KeyError 'step'): the step
       load_state_dict already restored is handed to that copy unchanged.
    2. load_state_dict gives every parameter the same "step" tensor; torch Adam increments it in place
       once per parameter, so the bias correction would run ahead: each parameter gets its own copy.
    """
    patched = []
    for sub, inner in _torch_adams(optimizer):
        if not hasattr(sub, "_set_main_param_and_optimizer_states"):
            continue
        original = sub._set_main_param_and_optimizer_states

        def with_step(model_param, tensors, sub=sub, inner=inner, original=original):
            group_index, group_order = sub.model_param_group_index_map[model_param]
            state = inner.state[inner.param_groups[group_index]["params"][group_order]]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            original(model_param, tensors)

        sub._set_main_param_and_optimizer_states = with_step
        patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            del sub._set_main_param_and_optimizer_states
    for _, inner in _torch_adams(optimizer):
        for state in inner.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


# --- save ----------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_synced(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale_tmp(root: str) -> None:
    """Delete *.tmp dirs left by a save killed midway (only rank 0, before a new save starts)."""
    for name in os.listdir(root):
        if name.endswith(".tmp"):
            log.warning("removing %s left by an interrupted save", os.path.join(root, name))
            path = os.path.join(root, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _publish(root: str, tmp: str, final: str, iteration: int, meta: dict, keep_last: int) -> None:
    """Rank 0: meta into the tmp dir, rename to the step dir, then the marker (temp file + rename)."""
    _write_json_synced(os.path.join(tmp, META), meta)
    _fsync_dir(tmp)
    if os.path.exists(final):  # re-saving an iteration: move the old one aside, drop it after
        os.rename(final, final + ".replaced.tmp")
    os.rename(tmp, final)
    _fsync_dir(root)
    marked = _marked_iteration(root)
    if marked is not None and marked > iteration:
        # the marker never moves backwards: a later step of this directory stays the one a resume takes
        log.warning("%s names iteration %d, later than %d: left as it is", os.path.join(root, MARKER), marked,
                    iteration)
    else:
        marker_tmp = os.path.join(root, MARKER + ".tmp")
        with open(marker_tmp, "w") as f:
            f.write(f"{iteration}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker_tmp, os.path.join(root, MARKER))
        _fsync_dir(root)
    if os.path.exists(final + ".replaced.tmp"):
        shutil.rmtree(final + ".replaced.tmp")
    prune(root, keep_last)


def prune(root: str, keep_last: int) -> list[str]:
    """Delete the oldest published step dirs beyond keep_last (<= 0 keeps all); the marker's is kept."""
    if keep_last <= 0:
        return []
    steps = _published_steps(root)
    latest = latest_checkpoint(root)
    removed = []
    for _, path in steps[: max(0, len(steps) - keep_last)]:
        if path != latest:
            shutil.rmtree(path)
            removed.append(path)
    return removed


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
) -> str:
    """Save a checkpoint of every rank's state to ROOT/iter_NNNNNNN (collective: call on all ranks).

    model_chunks: this rank's model chunks (megatron DDP-wrapped or not), one per virtual stage.
    optimizer: megatron optimizer (None on every rank: a weights-only checkpoint, "model" alone);
    scheduler: OptimizerParamScheduler.
    meta: JSON-serialisable run state for megasail.json (stage, loader_state, config, consumed ...);
    iteration, layout, format_version and weights_only are added here.
    async_save: on GPU, write the shards in the background (call ``finalize_async_saves`` every step
    and with blocking=True before exit); on CPU the save is synchronous.
    Returns the step dir (published on return when synchronous).
    """
    finalize_async_saves(blocking=True)  # one save in flight at a time; its .tmp dir must not be swept
    _writer_queue_dies_with_this_process()
    rank = dist.get_rank()
    weights_only = not _any_rank(_has_optimizer(optimizer))
    final = step_dir(root, iteration)
    tmp = final + ".tmp"
    full_meta = {
        **meta,
        "iteration": int(iteration),
        "format_version": FORMAT_VERSION,
        "layout": _layout(),
        "weights_only": weights_only,
        "optimizer_sharding": None if weights_only else OPTIMIZER_SHARDING,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        json.dumps(full_meta)
    except TypeError as e:
        raise TypeError(f"checkpoint meta for {final} is not JSON-serialisable: {e}") from None
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        _remove_stale_tmp(root)
        os.makedirs(tmp)
    dist.barrier()

    metadata = sharding_metadata()
    state = {"model": model_sharded_state_dict(model_chunks, metadata)[0]}
    if not weights_only:  # a weights-only checkpoint holds "model" alone
        state["rng_state"] = rng_sharded_object()
        if _has_optimizer(optimizer):
            _materialize_adam_state(optimizer)
            state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=metadata)
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
    content = {k: v for k, v in metadata.items() if k != "dp_cp_group"}
    use_async = async_save and torch.cuda.is_available()
    if async_save and not use_async:
        log.info("checkpoint.async_save needs a GPU: saving synchronously")
    request = dist_checkpointing.save(
        state, tmp, sharded_strategy=_save_strategy(), async_sharded_save=use_async, content_metadata=content
    )

    def publish():
        pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
        if pause > 0:
            time.sleep(pause)
        if rank == 0:
            _publish(root, tmp, final, iteration, full_meta, keep_last)
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


# --- load ----------------------------------------------------------------------------------------


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _global_shapes(value) -> list[tuple]:
    built = value.build() if isinstance(value, ShardedTensorFactory) else value
    items = built if isinstance(built, list) else [built]
    return [tuple(x.global_shape) for x in items if hasattr(x, "global_shape")]


def _checkpoint_keys(step: str) -> dict:
    """{key: metadata} of everything a checkpoint stores; ShardedObjects are listed per shard
    ("<key>/shard_0_2"), folded here into their key."""
    return {key.split("/shard_")[0]: value for key, value in load_sharded_metadata(step).items()}


_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _vocab_mismatch(step: str, merged: dict, ckpt: dict) -> str | None:
    """One line when the checkpoint's padded vocabulary differs from the model's, else None."""
    for key, value in merged.items():
        if key.endswith(_VOCAB_KEYS) and key in ckpt and hasattr(ckpt[key], "global_shape"):
            saved = tuple(ckpt[key].global_shape)
            for shape in _global_shapes(value):
                if shape != saved and shape[1:] == saved[1:]:
                    return (
                        f"checkpoint {step} has a vocabulary of {saved[0]} ({key}), this run builds "
                        f"{shape[0]}: set model.language.vocab_size={saved[0]}"
                    )
    return None


def _check_model_keys(step: str, merged: dict, ckpt: dict) -> None:
    """Raise on every rank, naming keys, when the checkpoint's model keys or shapes differ from the model's.

    ``_extra_state`` entries (Transformer Engine's FP8 metadata; None on local layers) may be absent on
    either side, so CPU checkpoints load with TE and back; the caller drops those not in the checkpoint.
    """
    ckpt_model = {k for k in ckpt if not k.startswith(_NON_MODEL_PREFIXES)}
    vocab = _vocab_mismatch(step, merged, ckpt)
    problems = [vocab] if vocab else []
    lacking = [k for k in merged if k not in ckpt and not k.endswith("_extra_state")]
    if lacking:
        problems.append(f"{len(lacking)} model keys are not in the checkpoint: {_listed(lacking)}")
    for key, value in merged.items():
        if key in ckpt and hasattr(ckpt[key], "global_shape"):
            for shape in _global_shapes(value):
                if shape != tuple(ckpt[key].global_shape) and not (vocab and key.endswith(_VOCAB_KEYS)):
                    problems.append(
                        f"{key}: checkpoint shape {tuple(ckpt[key].global_shape)}, model shape {shape}"
                    )
    requested = [None] * dist.get_world_size()
    dist.all_gather_object(requested, sorted(merged))
    all_requested = set().union(*requested)
    extra = [k for k in ckpt_model - all_requested if not k.endswith("_extra_state")]
    if extra:
        problems.append(
            f"{len(extra)} checkpoint model keys match no parameter of this model: {_listed(extra)}"
        )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    messages = sorted({m for rank_problems in gathered for m in rank_problems})
    vocab_lines = [m for m in messages if "has a vocabulary of" in m]
    if vocab_lines and len(messages) == 1:
        raise CheckpointMismatchError(vocab_lines[0])
    if messages:
        raise CheckpointMismatchError(
            f"checkpoint {step} does not match the model:\n  " + "\n  ".join(messages)
        )


def _check_optimizer_keys(step: str, optimizer_sharded: dict, ckpt: dict) -> None:
    """Raise on every rank when the checkpoint lacks optimizer state this run needs."""
    lacking = sorted(
        {v.key for v in nested_values(optimizer_sharded) if isinstance(v, ShardedBase)} - set(ckpt)
    )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, lacking[:_MAX_LISTED])
    lacking = sorted({k for keys in gathered for k in keys})
    if lacking:
        raise CheckpointMismatchError(
            f"checkpoint {step} lacks optimizer state this run needs: {_listed(lacking)}.\n"
            "Either those parameters were frozen when it was saved, or it was saved with another "
            "parallel.distributed_optimizer setting (only the distributed one keeps fp32 main weights, "
            "optimizer.state.param.*). Load it with weights_only=True for a fresh optimizer."
        )


def _load_chunks(model_chunks, per_chunk: list[dict], loaded: dict, step: str) -> None:
    for i, (chunk, sharded) in enumerate(zip(model_chunks, per_chunk, strict=True)):
        state = {name: loaded[value.key] for name, value in sharded.items() if value.key in loaded}
        missing, unexpected = _unwrap(chunk).load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"{step}: model chunk {i} missing {_listed(missing)}; unexpected {_listed(unexpected)}"
            )


def short_shard_files(step: str) -> list[tuple[str, int, int]]:
    """(file, size, size the metadata needs) of every shard file of a step dir shorter than its metadata
    says; [] when all are whole (or the metadata itself cannot be read)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(step).read_metadata()
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


def _corrupt_message(step: str, short: list[tuple[str, int, int]]) -> str:
    path, size, end = short[0]
    what = "is missing" if size < 0 else f"has {size} bytes, its metadata needs {end}"
    more = f" (and {len(short) - 1} more files)" if len(short) > 1 else ""
    root = os.path.dirname(os.path.abspath(step))
    m = _STEP_DIR.match(os.path.basename(os.path.abspath(step)))
    earlier = [p for it, p in _published_steps(root) if m and it < int(m[1])]
    fallback = (
        f"load the previous published step instead: checkpoint.load={earlier[-1]}"
        if earlier
        else "no earlier published step exists in this directory"
    )
    return f"checkpoint {step} is damaged: {path} {what}{more}; {fallback}"


def load_checkpoint(path, model_chunks, optimizer=None, scheduler=None, *, weights_only=False) -> dict:
    """Load a checkpoint into this rank's model (and optimizer, scheduler, RNG); returns its meta.

    path: a step dir, or a root whose marker names one. The checkpoint may come from any TP/PP/DP/VPP
    layout. weights_only: load only "model" (any checkpoint, e.g. one converted from HuggingFace);
    optimizer state, scheduler and RNG are left as they are, except that an optimizer passed in gets its
    fp32 main weights refreshed from the loaded model (bf16 training steps from those, not from the
    weights it was built with). RNG states are restored only at the saved layout.
    Raises CheckpointMismatchError (a KeyError) naming missing/unexpected keys or mismatched shapes,
    on every rank.
    """
    step = latest_checkpoint(path)
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {path} (no {MARKER} and no iter_* dir with {META})")
    meta = read_meta(step)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{step}: format_version {meta['format_version']} is newer than this code's {FORMAT_VERSION}"
        )
    want_optimizer = _has_optimizer(optimizer) and not weights_only
    if not weights_only and meta.get("weights_only") and _any_rank(want_optimizer or scheduler is not None):
        raise ValueError(
            f"{step} has model weights only (no optimizer state): load it with weights_only=True "
            "(checkpoint.weights_only=true) to start a fresh optimizer and schedule"
        )
    content = dist_checkpointing.load_content_metadata(step) or {}
    metadata = sharding_metadata(content.get("distrib_optim_sharding_type", OPTIMIZER_SHARDING))
    merged, per_chunk = model_sharded_state_dict(model_chunks, metadata)
    ckpt_keys = _checkpoint_keys(step)
    _check_model_keys(step, merged, ckpt_keys)
    request = {"model": {k: v for k, v in merged.items() if k in ckpt_keys}}
    if not weights_only and not meta.get("weights_only"):
        if meta.get("layout") == _layout():
            request["rng_state"] = rng_sharded_object()
        else:
            log.info(
                "%s was saved at layout %s, this run is %s: RNG states start from the seed",
                step,
                meta.get("layout"),
                _layout(),
            )
    if want_optimizer:
        _materialize_adam_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(request, is_loading=True, metadata=metadata)
    _check_optimizer_keys(step, request.get("optimizer", {}), ckpt_keys)
    try:
        loaded = dist_checkpointing.load(request, step, strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a short shard: EOFError deep inside DCP
        short = short_shard_files(step)
        if not short:
            raise
        raise CheckpointCorruptError(_corrupt_message(step, short)) from e
    _load_chunks(model_chunks, per_chunk, loaded["model"], step)
    if want_optimizer:
        with _torch_adam_load_fixes(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
    elif _has_optimizer(optimizer):
        optimizer.reload_model_params()  # main weights := loaded model weights (as Megatron-LM does)
    if not weights_only:
        if scheduler is not None:
            if "scheduler" not in loaded:
                raise KeyError(f"{step} has no scheduler state; load it with weights_only=True")
            scheduler.load_state_dict(loaded["scheduler"])
        if "rng_state" in request:
            _set_rng_state(loaded["rng_state"])
    return meta
