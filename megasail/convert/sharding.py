"""Slice an unsharded (TP=1, PP=1) megasail state dict into what one built model chunk holds.

Used where a whole checkpoint is already in memory (a HuggingFace directory converted on the fly
for generation). Each parameter says how megatron split it (``tensor_model_parallel`` and
``partition_dim`` attributes); decoder layers are renumbered from their global ``layer_number``.
Checkpoints on disk go through ``dist_checkpointing`` instead, which reshards by itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from megatron.core import parallel_state

_LAYER = re.compile(r"^(language_model\.decoder\.layers\.)(\d+)(\..*)$")


def _global_key(key: str, model) -> str:
    m = _LAYER.match(key)
    if not m:
        return key
    layer = model.language_model.decoder.layers[int(m[2])]
    return f"{m[1]}{layer.layer_number - 1}{m[3]}"


def _slice(full: torch.Tensor, param, key: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if key.startswith("language_model.") and key.endswith("mlp.linear_fc1.weight"):
        # SwiGLU: each rank holds [its gate rows; its up rows]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]])
    return full.chunk(tp_size, dim=dim)[tp_rank]


def load_full_state_dict(model, full: Mapping[str, torch.Tensor]) -> None:
    """Copy this rank's slices of ``full`` (megasail keys, TP=1/PP=1) into ``model`` (one chunk).

    A missing tensor or a shape mismatch raises with the key and both shapes. Tied output
    weights on a last stage that does not hold the embedding are taken from the embedding.
    """
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    own = model.state_dict()
    with torch.no_grad():
        for key, target in own.items():
            if key.endswith("_extra_state"):
                continue
            source_key = _global_key(key, model)
            if source_key == "language_model.output_layer.weight" and source_key not in full:
                source_key = "language_model.embedding.word_embeddings.weight"  # tied
            if source_key not in full:
                raise KeyError(f"checkpoint lacks '{source_key}' (model key '{key}')")
            local = _slice(full[source_key], params.get(key), key, tp_rank, tp_size)
            if local.shape != target.shape:
                raise ValueError(
                    f"'{source_key}': checkpoint slice {tuple(local.shape)} vs model {tuple(target.shape)}"
                )
            target.copy_(local)
