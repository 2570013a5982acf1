"""Exact parameter counts of a (tensor/pipeline) parallel model, per component."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

COMPONENTS = {"vision": "vision_model", "projector": "projector", "language": "language_model"}


def local_param_counts(chunks) -> dict[str, int]:
    """Parameters this rank holds, per component, counting each TP-replicated tensor on TP rank 0 only."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    counts = dict.fromkeys(COMPONENTS, 0)
    for chunk in chunks:
        module = getattr(chunk, "module", chunk)  # unwrap DDP
        for name, attr in COMPONENTS.items():
            part = getattr(module, attr, None)
            if part is None:
                continue
            for p in part.parameters():
                if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                    counts[name] += p.numel()
    return counts


def global_param_counts(chunks) -> dict[str, int]:
    """Whole-model parameter counts (summed over the TP x PP ranks of this model replica)."""
    local = local_param_counts(chunks)
    t = torch.tensor([local[k] for k in COMPONENTS], dtype=torch.float64)
    dist.all_reduce(t, group=parallel_state.get_model_parallel_group())
    counts = {k: int(v) for k, v in zip(COMPONENTS, t.tolist(), strict=True)}
    counts["total"] = sum(counts.values())
    return counts
