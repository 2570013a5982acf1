"""Build this rank's model chunks and wrap them for training (megatron DDP, distributed optimizer).

Placement, freezing and wrapping live here, not in ``megasail.models``: the model knows its
layers, training knows how they are split and which of them learn.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)

from megasail.config import ParallelConfig
from megasail.models.config import ModelConfig
from megasail.models.sail_vl import SailVLModel


def build_model_chunks(model_cfg: ModelConfig, parallel: ParallelConfig) -> list[SailVLModel]:
    """One SailVLModel per virtual pipeline chunk of this rank (a single one without virtual PP)."""
    vpp = parallel.virtual_pipeline
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        ignore_virtual = vp_stage is None
        chunks.append(
            SailVLModel(
                model_cfg,
                parallel,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=ignore_virtual, vp_stage=vp_stage),
                vp_stage=vp_stage,
            )
        )
    if torch.cuda.is_available():
        # megatron layers allocate on the current GPU; plain torch params (norms, ls1/ls2, patch conv) do not
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    return chunks


def freeze(chunks: list[SailVLModel], trainable: list[str]) -> None:
    """Keep ``requires_grad`` only on the named parts ("vision", "projector", "language").

    Must run before DDP wrapping: frozen parameters then get no grad buffer and no optimizer state.
    """
    parts = {"vision": "vision_model", "projector": "projector", "language": "language_model"}
    unknown = set(trainable) - set(parts)
    if unknown:
        raise ValueError(f"unknown trainable parts {sorted(unknown)}; choose from {sorted(parts)}")
    for chunk in chunks:
        for part, attr in parts.items():
            module = getattr(chunk, attr, None)
            if module is not None:
                module.requires_grad_(part in trainable)


def overlap_param_gather(parallel: ParallelConfig) -> bool:
    """Whether the distributed optimizer's parameter all-gather overlaps the next forward (GPU streams only)."""
    return parallel.overlap_grad_reduce and parallel.distributed_optimizer and torch.cuda.is_available()


def wrap_ddp(chunks: list[SailVLModel], parallel: ParallelConfig, *, bucket_size: int | None = None):
    """Wrap each chunk in megatron DDP and hook megatron's grad finalisation and overlapped communication
    into the schedule, as Megatron-LM's training loop does."""
    gather = overlap_param_gather(parallel)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=gather,
        align_param_gather=gather,  # the schedule starts each chunk's all-gather (param_sync_func below)
        use_distributed_optimizer=parallel.distributed_optimizer,
        bucket_size=bucket_size,
    )
    wrapped = [
        DistributedDataParallel(chunk.config, ddp_config, chunk, disable_bucketing=(i > 0))
        for i, chunk in enumerate(chunks)
    ]

    def per_chunk(name: str):
        funcs = [getattr(w, name) for w in wrapped]
        return funcs if len(funcs) > 1 else funcs[0]

    for chunk in chunks:
        config = chunk.config
        # all-reduce of sequence-parallel norm grads over TP, embedding grads over PP, DP reduce
        config.finalize_model_grads_func = finalize_model_grads
        if len(wrapped) > 1 or parallel.overlap_grad_reduce:
            config.no_sync_func = per_chunk("no_sync")
        if parallel.overlap_grad_reduce:  # each chunk's DP reduce starts as soon as its last backward ends
            config.grad_sync_func = per_chunk("start_grad_sync")
        if gather:  # each chunk's parameter all-gather starts ahead of its first forward
            config.param_sync_func = per_chunk("start_param_sync")
    return wrapped
