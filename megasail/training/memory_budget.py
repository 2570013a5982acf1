"""Start-up memory check: the estimate of ``megasail.models.memory`` against what this device has.

``memory_shortfall(cfg, world_size)`` returns None when the run's largest rank fits, else the message
``checks.check_memory`` raises: both numbers and what to change. The budget is the free memory of this
GPU (``torch.cuda.mem_get_info``), or on a CPU the available host RAM (psutil) shared by the local ranks;
the smallest budget over all ranks decides, so every rank stops or starts together.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megasail.models import memory
from megasail.models.specs import use_transformer_engine


def device_budget(world_size: int) -> tuple[float, str]:
    """(bytes this rank may use, where the number comes from)."""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        device = torch.cuda.current_device()
        return float(
            free
        ), f"free memory of GPU {device} ({free / memory.GIB:.1f} of {total / memory.GIB:.1f} GiB)"
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    available = psutil.virtual_memory().available
    return available / local, (
        f"available host RAM {available / memory.GIB:.1f} GiB shared by {local} local "
        f"rank{'s' if local > 1 else ''}"
    )


def _smallest_over_ranks(value: float) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    on_gpu = dist.get_backend() == "nccl"
    t = torch.tensor([value], dtype=torch.float64, device=torch.cuda.current_device() if on_gpu else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def run_estimate(cfg, world_size: int) -> tuple[memory.StageMemory, str, memory.MemoryLayout]:
    """The pipeline rank and curriculum stage that need the most memory: (estimate, stage name, layout).
    Image tiles per sequence are the plan's default: 3/4 of a sequence's tokens."""
    p, d = cfg.parallel, cfg.data
    dp = max(world_size // (p.tensor * p.pipeline * p.context), 1)
    tiles = 0.75 * d.seq_length / cfg.model.tokens_per_tile
    layout = memory.MemoryLayout.from_run(
        cfg,
        dp,
        tiles,
        flash_attention=use_transformer_engine(cfg.model.transformer_impl),
        device="gpu" if torch.cuda.is_available() else "cpu",
    )
    best = None
    for stage in d.stages:
        largest = memory.largest_stage(memory.stage_memory(cfg.model, layout, list(stage.trainable)))
        if best is None or largest.total > best[0].total:
            best = (largest, stage.name)
    return best[0], best[1], layout


def memory_shortfall(cfg, world_size: int) -> str | None:
    """None when the largest rank's estimate fits this device's budget, else the refusal message."""
    need, stage, layout = run_estimate(cfg, world_size)
    own, source = device_budget(world_size)
    budget = _smallest_over_ranks(own)
    if need.total <= budget:
        return None
    g = need.gib()
    parts = ", ".join(
        f"{k} {g[k + '_gib']:.2f}"
        for k in ("weights", "grads", "optimizer", "activations", "logits", "inputs", "transient")
    )
    where = source if budget == own else f"the smallest budget of all ranks; here: {source}"
    return (
        f"the run needs about {need.total / memory.GIB:.2f} GiB per rank (stage {stage!r}, pipeline rank "
        f"{need.pp_rank} of {layout.pipeline}, TP={layout.tensor}, DP={layout.data_parallel}, "
        f"micro-batch {layout.micro_batch_size} x {layout.seq_length} tokens, recompute={layout.recompute}; "
        f"GiB: {parts}) but has {budget / memory.GIB:.2f} GiB ({where}): {memory.remedies(layout)}; "
        "tools/model_summary.py prints the estimate per pipeline stage; "
        "train.memory_check=false starts anyway"
    )
