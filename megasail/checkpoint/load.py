"""Load a checkpoint into a run's model, optimizer, scheduler and RNG, at any TP/PP/DP/VPP layout.

Before any tensor is read the model's keys and global shapes are compared with the checkpoint's; a
mismatch raises ``CheckpointMismatchError`` on every rank (a different padded vocabulary alone is one
line naming ``model.language.vocab_size``). A shard file shorter than its metadata raises
``CheckpointCorruptError`` naming the file and the previous published step to load instead.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedTensorFactory
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.validation import StrictHandling

from megasail.checkpoint.compat import LOAD_ERRORS, materialize_adam_state, torch_adam_load_fixes
from megasail.checkpoint.errors import CheckpointCorruptError, CheckpointMismatchError
from megasail.checkpoint.layout import earlier_published, require_checkpoint
from megasail.checkpoint.meta import CheckpointMeta, read_meta
from megasail.checkpoint.sharded import (
    any_rank,
    current_layout,
    has_optimizer,
    model_sharded_state_dict,
    rng_sharded_object,
    set_rng_state,
    sharding_metadata,
    unwrap,
)
from megasail.checkpoint.tensors import short_shard_files

log = logging.getLogger(__name__)

_NON_MODEL_PREFIXES = ("optimizer.", "rng_state", "chained_")  # chained_<i>.optimizer.: several optimizers
_MAX_LISTED = 20


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


def _check_optimizer_layout(
    step: str, saved: CheckpointMeta, sharding: str, ckpt: dict, wanted: bool
) -> None:
    """Raise on every rank when a dp_reshardable optimizer state (the distributed optimizer's flat buffers,
    laid out as the model is at the saved TP/PP/VPP) is asked for at another TP, PP or VPP."""
    here = current_layout()
    moved = [k for k in ("tp", "pp", "vpp") if saved.layout is not None and saved.layout.get(k) != here[k]]
    buffers = any(".gbuf_idx_" in key for key in ckpt)  # what megatron's dp_reshardable layout writes
    if sharding != "dp_reshardable" or not buffers or not moved or not any_rank(wanted):
        return
    at = " ".join(f"{k.upper()}={saved.layout.get(k)}" for k in ("tp", "pp", "vpp"))
    now = " ".join(f"{k.upper()}={here[k]}" for k in ("tp", "pp", "vpp"))
    raise CheckpointMismatchError(
        f"{step} holds the distributed optimizer's state as dp_reshardable, saved at {at}: it resumes at "
        f"any DP size but only at that TP/PP/VPP, and this run is {now}. Resume at {at}; or load the "
        "weights only (checkpoint.weights_only=true: a fresh optimizer and schedule); or save it again "
        f"from a run at {at} with checkpoint.optimizer_sharding=fully_reshardable, which resumes at any "
        "layout."
    )


def _load_chunks(model_chunks, per_chunk: list[dict], loaded: dict, step: str) -> None:
    for i, (chunk, sharded) in enumerate(zip(model_chunks, per_chunk, strict=True)):
        state = {name: loaded[value.key] for name, value in sharded.items() if value.key in loaded}
        missing, unexpected = unwrap(chunk).load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"{step}: model chunk {i} missing {_listed(missing)}; unexpected {_listed(unexpected)}"
            )


def _corrupt_message(step: str, short: list[tuple[str, int, int]]) -> str:
    path, size, end = short[0]
    what = "is missing" if size < 0 else f"has {size} bytes, its metadata needs {end}"
    more = f" (and {len(short) - 1} more files)" if len(short) > 1 else ""
    earlier = earlier_published(step)
    fallback = (
        f"load the previous published step instead: checkpoint.load={earlier}"
        if earlier
        else "no earlier published step exists in this directory"
    )
    return f"checkpoint {step} is damaged: {path} {what}{more}; {fallback}"


def load_checkpoint(path, model_chunks, optimizer=None, scheduler=None, *, weights_only=False) -> dict:
    """Load a checkpoint into this rank's model (and optimizer, scheduler, RNG); returns its meta.

    path: a step dir, or a root whose marker names one. The checkpoint may come from any TP/PP/DP/VPP
    layout, except that a dp_reshardable optimizer state loads only at its TP/PP/VPP (at any DP size).
    weights_only: load only "model" (any checkpoint, e.g. one converted from HuggingFace); optimizer
    state, scheduler and RNG are left as they are, except that an optimizer passed in gets its fp32 main
    weights refreshed from the loaded model (bf16 training steps from those, not from the weights it was
    built with). RNG states are restored only at the saved layout.
    Raises CheckpointMismatchError (a KeyError) naming missing/unexpected keys or mismatched shapes,
    on every rank; CheckpointCorruptError for a shard file shorter than its metadata; FileNotFoundError
    without a checkpoint; ValueError for a newer format_version or an optimizer asked of a weights-only one.
    """
    step = require_checkpoint(path)
    meta = read_meta(step)  # ValueError for a newer format_version
    saved = CheckpointMeta.from_json(meta, step)
    want_optimizer = has_optimizer(optimizer) and not weights_only
    if not weights_only and saved.weights_only and any_rank(want_optimizer or scheduler is not None):
        raise ValueError(
            f"{step} has model weights only (no optimizer state): load it with weights_only=True "
            "(checkpoint.weights_only=true) to start a fresh optimizer and schedule"
        )
    content = dist_checkpointing.load_content_metadata(step) or {}
    # the layout the optimizer state was written in (checkpoints from before the choice: fully_reshardable)
    sharding = content.get("distrib_optim_sharding_type") or saved.optimizer_sharding or "fully_reshardable"
    metadata = sharding_metadata(sharding)
    merged, per_chunk = model_sharded_state_dict(model_chunks, metadata)
    ckpt_keys = _checkpoint_keys(step)
    if not weights_only and not saved.weights_only:
        _check_optimizer_layout(step, saved, sharding, ckpt_keys, want_optimizer)
    _check_model_keys(step, merged, ckpt_keys)
    request = {"model": {k: v for k, v in merged.items() if k in ckpt_keys}}
    if not weights_only and not saved.weights_only:
        if saved.layout == current_layout():
            request["rng_state"] = rng_sharded_object()
        else:
            log.info(
                "%s was saved at layout %s, this run is %s: RNG states start from the seed",
                step,
                saved.layout,
                current_layout(),
            )
    if want_optimizer:
        materialize_adam_state(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(request, is_loading=True, metadata=metadata)
    _check_optimizer_keys(step, request.get("optimizer", {}), ckpt_keys)
    try:
        loaded = dist_checkpointing.load(request, step, strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    except LOAD_ERRORS as e:  # a short shard: EOFError deep inside DCP
        short = short_shard_files(step)
        if not short:
            raise
        raise CheckpointCorruptError(_corrupt_message(step, short)) from e
    _load_chunks(model_chunks, per_chunk, loaded["model"], step)
    if want_optimizer:
        # no_grad: megatron's dp_reshardable load copies in place into fp32 main weights, which in fp32
        # runs are views of the model's parameters (leaves requiring grad)
        with torch_adam_load_fixes(optimizer), torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
    elif has_optimizer(optimizer):
        optimizer.reload_model_params()  # main weights := loaded model weights (as Megatron-LM does)
    if not weights_only:
        if scheduler is not None:
            if "scheduler" not in loaded:
                raise KeyError(f"{step} has no scheduler state; load it with weights_only=True")
            scheduler.load_state_dict(loaded["scheduler"])
        if "rng_state" in request:
            set_rng_state(loaded["rng_state"])
    return meta
