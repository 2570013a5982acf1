"""HuggingFace weights -> a megasail torch_dist checkpoint, streamed tensor by tensor on one CPU process.

Keys and sharding come from the model itself: a TP=1/PP=1 ``SailVLModel`` is built on the meta
device (no memory) and ``megasail.checkpoint.model_sharded_state_dict`` gives its sharded state dict
exactly as training saves it (Transformer Engine key names, global layer numbers, SwiGLU factories),
so what is written here loads through ``load_checkpoint`` at any TP/PP/DP. Writing, megasail.json and
publishing are the checkpoint package's (``megasail.checkpoint.save_streamed``, ``CheckpointMeta``);
reading a checkpoint back is ``megasail.checkpoint.DistSource``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megasail.checkpoint import CheckpointMeta, model_sharded_state_dict, save_streamed, utc_now
from megasail.models.config import ModelConfig


def meta_model(config: ModelConfig):
    """TP=1/PP=1 SailVLModel on the meta device (parameters have shapes, no storage).
    Needs megasail.runtime.initialize(1, 1) first (sharded state dicts read parallel_state)."""
    from megasail.models.sail_vl import SailVLModel

    with torch.device("meta"):
        return SailVLModel(config)


def checkpoint_names(model) -> tuple[dict[str, str], dict[str, tuple[int, ...]], dict]:
    """(checkpoint key -> TP=1 state-dict name, state-dict name -> shape, merged sharded state dict)."""
    merged, per_chunk = model_sharded_state_dict([model])
    names, shapes = {}, {}
    for name, value in per_chunk[0].items():
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            names[value.key] = name
            shapes[name] = tuple(value.data.shape)
    return names, shapes, merged


def write_weights_checkpoint(
    root: str, model, produce: Callable[[str], torch.Tensor], *, config_yaml: str, progress=None
) -> str:
    """Write ROOT/iter_0000000 (weights only, published like save_checkpoint) from ``produce(name)``
    (TP=1 state-dict name -> full tensor, made once per name, in the writer's order)."""
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

    meta = CheckpointMeta(
        iteration=0,
        layout={"tp": 1, "pp": 1, "vpp": None, "dp": 1},
        weights_only=True,
        optimizer_sharding=None,
        saved_at=utc_now(),
        run={
            "config": config_yaml,
            # a resume without weights_only reaches load_checkpoint's error
            "stage": {"index": 0, "name": "converted"},
            "stage_start_step": 0,
            "stage_iteration": 0,
            "consumed_samples": 0,
            "consumed_tokens": 0,
            "converted_from": "huggingface",
        },
    )
    return save_streamed(root, merged, make, meta, progress)
