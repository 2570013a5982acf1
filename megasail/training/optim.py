"""Optimizer and per-stage learning-rate schedule on megatron-core's own classes.

Each curriculum stage gets its own ``OptimizerParamScheduler`` whose clock is the stage's budget:
it advances by the tokens (or samples) each global batch consumed, so warmup and decay end
exactly when the loader reports the budget spent, whatever the packing made of the steps.
A stage without a budget runs on optimizer steps up to ``train.iters``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megasail.config import RunConfig
from megasail.data.loader.config import StageConfig

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_STYLES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}


def stage_lr(cfg: RunConfig, stage: StageConfig) -> tuple[float, float]:
    """(peak, final) learning rate of a stage: its own values, else optim's."""
    lr = stage.lr if stage.lr is not None else cfg.optim.lr
    min_lr = stage.min_lr if stage.min_lr is not None else cfg.optim.min_lr
    if not 0 <= min_lr <= lr:
        raise ValueError(f"stage {stage.name!r}: min_lr {min_lr} must lie in [0, lr={lr}]")
    return lr, min_lr


def build_optimizer(cfg: RunConfig, model, stage: StageConfig):
    """megatron's (distributed) Adam over the DDP-wrapped chunks' trainable parameters."""
    lr, min_lr = stage_lr(cfg, stage)
    o, p = cfg.optim, cfg.parallel
    dtype = _DTYPES[cfg.model.precision]
    config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=p.distributed_optimizer,
        overlap_param_gather=p.distributed_optimizer and p.overlap_grad_reduce and torch.cuda.is_available(),
    )
    return get_megatron_optimizer(config, model)


@dataclass(frozen=True)
class StageClock:
    """How a stage's schedule measures progress: units of ``unit`` (tokens, samples or steps)."""

    unit: str
    total: float  # the stage's length in units (schedule end)
    tokens_per_sample: float = 0.0  # with both budgets: samples are converted to token units

    def progress(self, position) -> float:
        """Units the stage has consumed at a loader position inside it."""
        if self.unit == "steps":
            return float(position.stage_batches)
        if self.unit == "samples":
            return float(position.stage_samples)
        return max(float(position.stage_tokens), position.stage_samples * self.tokens_per_sample)

    def increment(self, before, after) -> float:
        """Units one global batch consumed, from the loader positions around it. The batch that ends
        the stage moves the clock to the end (the loader resets the counters for the next stage)."""
        if after.stage != before.stage or after.finished:
            return max(self.total - self.progress(before), 0.0)
        return self.progress(after) - self.progress(before)


def stage_clock(cfg: RunConfig, stage: StageConfig, stage_start_step: int) -> StageClock:
    """The schedule clock of ``stage``; ``stage_start_step`` is the global step it started at."""
    if stage.budget_tokens is not None and stage.budget_samples is not None:
        return StageClock("tokens", float(stage.budget_tokens), stage.budget_tokens / stage.budget_samples)
    if stage.budget_tokens is not None:
        return StageClock("tokens", float(stage.budget_tokens))
    if stage.budget_samples is not None:
        return StageClock("samples", float(stage.budget_samples))
    if cfg.train.iters is None:
        return StageClock("steps", math.inf)  # runs until stopped: constant after warmup
    return StageClock("steps", float(max(cfg.train.iters - stage_start_step, 1)))


def build_scheduler(
    cfg: RunConfig, optimizer, stage: StageConfig, clock: StageClock
) -> OptimizerParamScheduler:
    """Warmup then ``optim.schedule`` decay to min_lr over the stage's clock."""
    o = cfg.optim
    lr, min_lr = stage_lr(cfg, stage)
    warmup_steps = stage.warmup_steps if stage.warmup_steps is not None else o.warmup_steps
    finite = math.isfinite(clock.total)
    if warmup_steps is not None:
        per_step = {
            "steps": 1.0,
            "samples": float(cfg.data.global_batch_size),
            "tokens": float(cfg.data.global_batch_size * cfg.data.seq_length),
        }[clock.unit]
        warmup = warmup_steps * per_step  # token budgets: steps of full global batches
    else:
        warmup = o.warmup_fraction * clock.total if finite else 0.0
    style = _STYLES[o.schedule] if finite else "constant"
    total = clock.total if finite else max(warmup, 1.0) * 2
    warmup = min(warmup, total * 0.999)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total,
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        wsd_decay_steps=o.wsd_decay_fraction * total if style == "WSD" else None,
        lr_wsd_decay_style=o.wsd_decay_style if style == "WSD" else None,
    )


@torch.no_grad()
def optimizer_step(optimizer) -> tuple[bool, float, bool]:
    """One update that is skipped when the gradient norm is not finite: (updated, grad_norm, overflow).

    ``overflow``: fp16 dynamic loss scaling found inf/NaN and lowered the scale (a routine skip,
    not a sign of divergence).

    The same sequence as megatron's ``ChainedOptimizer.step`` (prepare grads, global norm, clip
    by that norm, step), with a finiteness check between: megatron only detects inf/NaN under
    fp16 loss scaling, and a NaN norm would otherwise pass the clip unscaled into every weight.
    """
    if optimizer.prepare_grads():  # fp16 loss scaling found inf/NaN (and lowered the scale)
        return False, float("nan"), True
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm, False
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if opt.config.clip_grad > 0.0 and params and not getattr(opt, "is_stub_optimizer", False):
            clip_grad_by_total_norm_fp32(
                params,
                max_norm=opt.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return bool(optimizer.step_with_ready_grads()), grad_norm, False
