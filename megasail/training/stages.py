"""What trains in a curriculum stage: frozen set, DDP wrapping, optimizer and schedule, rebuilt per stage.

megatron's DDP and distributed optimizer fix their parameter set when built (grad buffers,
buckets, fp32 main params, optimizer state), so a stage that changes what trains gets new ones:
the previous DDP and optimizer are dropped (frozen parameters then hold no gradient buffer and
no optimizer state) and the stage's own learning-rate schedule starts from zero.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from megasail.config import RunConfig
from megasail.data.loader.config import StageConfig
from megasail.training.model_builder import freeze, wrap_ddp
from megasail.training.optim import StageClock, build_optimizer, build_scheduler, stage_clock

log = logging.getLogger(__name__)


@dataclass
class StageRun:
    """The training state of one stage: DDP-wrapped chunks, optimizer, scheduler and clock."""

    index: int
    stage: StageConfig
    model: list  # megatron DistributedDataParallel, one per model chunk
    optimizer: object
    scheduler: object
    clock: StageClock
    start_step: int  # global optimizer step at which the stage began


def _release(previous: StageRun, chunks) -> None:
    """Drop a stage's DDP and optimizer so nothing of them survives into the next stage.

    megatron's DDP hangs its gradient hooks on each parameter's autograd accumulator node and keeps
    those nodes alive (``grad_accs``); the hooks hold the DDP, a cycle through C++ that Python's
    collector cannot see, so neither would ever die, and a new DDP would hook the same nodes: the old
    hooks would fire after the new ones (with overlap_grad_reduce: "param.grad being None is not
    safe") and the old grad buffers would stay. So the nodes are let go (the hooks die with them), the
    hooks are made inert in case something still holds one, every other reference to the old DDP and
    optimizer goes (the schedule's config callbacks hold the optimizer, which holds the DDP), and the
    old ones are collected before the next DDP is built.
    DDP also points every parameter's ``.data`` into its contiguous buffer and gives it ``main_grad``:
    each parameter gets its own storage back, so the old buffers are freed.
    """
    for wrapped in previous.model:
        if getattr(wrapped, "use_forward_hook", False):
            wrapped.disable_forward_pre_hook(param_sync=True)  # the last update reaches the params first
        wrapped.param_to_bucket_group = {}  # its backward hooks do nothing for a parameter not in here
        # the accumulator nodes die with their last reference, and the hooks (which hold the DDP) with them
        wrapped.grad_accs = []
    for chunk in chunks:
        config = chunk.config
        config.grad_scale_func = None  # a bound method of the old optimizer
        config.no_sync_func = None  # the old DDP's no_sync
        config.grad_sync_func = config.param_sync_func = None  # its start_grad_sync / start_param_sync
        for param in chunk.parameters():
            param.data = param.data.clone()
            for attr in ("main_grad", "grad_added_to_main_grad"):
                if hasattr(param, attr):
                    delattr(param, attr)
            param.grad = None
    previous.model.clear()
    previous.optimizer = previous.scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def trainable_params(chunks) -> int:
    """Trainable parameters this rank holds (after freezing)."""
    return sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)


def start_stage(
    cfg: RunConfig, chunks, index: int, start_step: int, previous: StageRun | None = None
) -> StageRun:
    """Freeze, wrap and build the optimizer and schedule of stage ``index`` (chunks: unwrapped models)."""
    stage = cfg.data.stages[index]
    if previous is not None:
        _release(previous, chunks)
    freeze(chunks, stage.trainable)
    model = wrap_ddp(chunks, cfg.parallel)
    optimizer = build_optimizer(cfg, model, stage)
    clock = stage_clock(cfg, stage, start_step)
    scheduler = build_scheduler(cfg, optimizer, stage, clock)
    for chunk in chunks:  # fp16 loss scaling (a factor of 1 otherwise), as megatron's training sets it
        chunk.config.grad_scale_func = optimizer.scale_loss
    if parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0:
        log.info(
            "stage %d %r: trains %s (%d parameters on pipeline stage %d), schedule over %s %s",
            index,
            stage.name,
            stage.trainable,
            trainable_params(chunks),
            parallel_state.get_pipeline_model_parallel_rank(),
            clock.total,
            clock.unit,
        )
    return StageRun(index, stage, model, optimizer, scheduler, clock, start_step)


def apply_recompute(chunks, recompute: str, num_layers: int) -> None:
    """Activation recomputation on every transformer block (ViT and LLM) of the built chunks.

    ``full`` is read by megatron's TransformerBlock at each forward; ``selective`` (core
    attention) is fixed per attention module at build, so its flag is set on the modules too.
    """
    if recompute == "none":
        return
    from megatron.core.transformer.attention import Attention
    from megatron.core.transformer.transformer_block import TransformerBlock

    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, TransformerBlock):
                config = module.config
                config.recompute_granularity = recompute
                if recompute == "full":
                    config.recompute_method, config.recompute_num_layers = "uniform", num_layers
                else:
                    config.recompute_modules = ["core_attn"]
            elif isinstance(module, Attention) and recompute == "selective":
                module.checkpoint_core_attention = True
