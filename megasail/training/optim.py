"""Optimizer and per-stage learning-rate schedule on megatron-core's own classes.

Each curriculum stage gets its own scheduler (megatron's ``OptimizerParamScheduler``) whose clock is
the stage's budget: it advances by the tokens (or samples) each global batch consumed, so the decay
ends exactly when the loader reports the budget spent, whatever the packing made of the steps.
Warmup is counted in optimizer steps (``optim.warmup_steps``) or as a fraction of the clock.
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
from megasail.models.mcore_config import PRECISION_DTYPES
from megasail.training.model_builder import overlap_param_gather

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
    dtype = PRECISION_DTYPES[cfg.model.precision]
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
        overlap_param_gather=overlap_param_gather(p),
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


class StageScheduler(OptimizerParamScheduler):
    """megatron's ``OptimizerParamScheduler`` on a stage clock, with warmup counted in optimizer steps.

    The loop calls ``advance(units)`` once per optimizer step, before the update, with the clock units
    (tokens, samples or steps) the step's data consumes, and the step runs at the learning rate it sets:
    - warmup counts the step's own data: step k of a W-step warmup runs at lr * k / W, so a stage's first
      step learns (megatron's scheduler gives it ``init_lr`` = 0, one wasted step per stage) and step W
      runs at the peak; a clock warmup (``optim.warmup_fraction``) likewise uses the clock at the end of
      the step's data;
    - the decay reads the clock at the start of the step's data, as megatron's does: the first step
      after warmup runs at the peak and the one that spends the budget just above min_lr.

    ``warmup_optimizer_steps`` > 0: the warmup rises over that many optimizer steps whatever the clock's
    unit (a packed step holds a varying number of samples and tokens), and the decay runs on the clock
    from where the warmup ended. 0: megatron's warmup over ``lr_warmup_steps`` clock units.
    """

    def __init__(self, optimizer, *, warmup_optimizer_steps: int = 0, **kwargs):
        self.warmup_optimizer_steps = int(warmup_optimizer_steps)
        self.optimizer_steps = 0
        self.step_start = 0.0  # the clock where the current step's data starts
        super().__init__(optimizer, **kwargs)

    def advance(self, units: float) -> None:
        """Count one optimizer step that consumes ``units`` of the clock and set its learning rate."""
        self.step_start = float(self.num_steps)
        self.optimizer_steps += 1
        if self.warmup_optimizer_steps and self.optimizer_steps == self.warmup_optimizer_steps + 1:
            self.lr_warmup_steps = self.step_start  # the decay starts where the step warmup ended
        self.step(increment=units)

    def get_lr(self, param_group: dict) -> float:
        if self.warmup_optimizer_steps:
            if self.optimizer_steps <= self.warmup_optimizer_steps:
                max_lr = param_group.get("max_lr", self.max_lr)
                return self.init_lr + (max_lr - self.init_lr) * self.optimizer_steps / self.warmup_optimizer_steps
        elif self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return super().get_lr(param_group)  # clock warmup at the end of the step's data
        # megatron's decay at the start of the step's data (never inside a finished warmup)
        end, self.num_steps = self.num_steps, max(self.step_start, self.lr_warmup_steps)
        try:
            return super().get_lr(param_group)
        finally:
            self.num_steps = end

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "optimizer_steps": self.optimizer_steps,
            "warmup_optimizer_steps": self.warmup_optimizer_steps,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer_steps = int(state_dict.get("optimizer_steps", 0))
        if not self.override_opt_param_scheduler:
            self.warmup_optimizer_steps = int(state_dict.get("warmup_optimizer_steps", self.warmup_optimizer_steps))
        super().load_state_dict(state_dict)  # megatron's: restores the clock (num_steps) and the plan
        if self.warmup_optimizer_steps and self.optimizer_steps > self.warmup_optimizer_steps:
            # where the step warmup ended on the clock is run state, not a setting: kept when re-planning
            self.lr_warmup_steps = state_dict["lr_warmup_steps"]
        self.step_start = float(self.num_steps)  # the next advance() sets the next step's lr


def build_scheduler(
    cfg: RunConfig, optimizer, stage: StageConfig, clock: StageClock
) -> StageScheduler:
    """Warmup (optimizer steps, or a fraction of the clock) then ``optim.schedule`` decay to min_lr
    over the stage's clock."""
    o = cfg.optim
    lr, min_lr = stage_lr(cfg, stage)
    warmup_steps = stage.warmup_steps if stage.warmup_steps is not None else o.warmup_steps
    finite = math.isfinite(clock.total)
    clock_warmup = 0.0 if warmup_steps is not None else (o.warmup_fraction * clock.total if finite else 0.0)
    style = _STYLES[o.schedule] if finite else "constant"
    total = clock.total if finite else max(clock_warmup, 1.0) * 2
    return StageScheduler(
        optimizer,
        warmup_optimizer_steps=warmup_steps or 0,
        init_lr=0.0,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=min(clock_warmup, total * 0.999),
        lr_decay_steps=total,
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        # a resumed stage keeps the schedule it was planned with, unless optim.override_scheduler
        use_checkpoint_opt_param_scheduler=not o.override_scheduler,
        override_opt_param_scheduler=o.override_scheduler,
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
