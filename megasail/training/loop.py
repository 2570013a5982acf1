"""The training loop: ``pretrain(cfg)`` runs every curriculum stage of a run, resumably.

Per optimizer step, on every rank: fetch the step's micro-batches (``loader.next_step()``, a
collective over the model-parallel group, so outside the pipeline schedule), run megatron-core's
forward-backward schedule (interleaved with virtual pipeline stages), all-reduce the step's
loss sum and loss tokens over all ranks (the logged loss is the token-weighted mean over every
data-parallel rank), then update unless the loss or the gradient norm is not finite, and advance
the stage's learning-rate clock by the data the step consumed. A new stage from the loader
rebuilds what trains (``stages.start_stage``) before its first step.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megasail import checkpoint as ckpt  # save/load import dist_checkpointing on first use
from megasail.config import RunConfig, to_dict, to_yaml
from megasail.data.loader.model_parallel import build_data_loader
from megasail.data.loader.validation import build_validation_loader
from megasail.models.flops import FlopsModel, StepFlops, run_peak, step_metrics
from megasail.models.init import init_weights
from megasail.models.specs import use_transformer_engine
from megasail.runtime import init_process_group, initialize
from megasail.training.checks import StartupError, check_run
from megasail.training.costs import cost_model
from megasail.training.metrics import MetricsLogger, memory_gb
from megasail.training.model_builder import build_model_chunks
from megasail.training.optim import optimizer_step
from megasail.training.stages import StageRun, apply_recompute, start_stage
from megasail.training.step import forward_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class StopSignal:
    """SIGTERM (Slurm's ``--signal`` ahead of the time limit, a preemption) asks the run to stop: the
    loop finishes its step, saves once and returns. Installed in the main thread only."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _slowest_and_fastest(elapsed: float) -> tuple[float, float]:
    """The step's wall time on the slowest and on the fastest rank (one all-reduce for both)."""
    times = torch.tensor([elapsed, -elapsed], dtype=torch.float64, device=_device())
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return times[0].item(), -times[1].item()


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _sample_tokens(batch: dict, seq_length: int) -> int:
    """Tokens of real samples (padding excluded): each row's first num_samples segments."""
    cu, total = batch["cu_seqlens"].tolist(), 0
    for row, n in enumerate(batch["num_samples"].tolist()):
        inner = [b for b in cu if row * seq_length <= b <= (row + 1) * seq_length]
        total += inner[n] - inner[0] if n else 0
    return total


def _step_terms(
    batches: list[dict], logs: list[dict], cfg: RunConfig, flops: FlopsModel, trainable: list[str],
    stop_requested: bool = False,
):
    """This rank's share of the step's global sums: [loss sum, loss tokens, sample tokens, samples,
    stop requests, *StepFlops]. The loss comes from the last pipeline stage's TP rank 0, the work
    counts from the first stage's TP rank 0, so each is counted once per data-parallel replica; a
    SIGTERM may reach the ranks at different steps, so the sum decides on every rank at once."""
    terms = torch.zeros(5 + len(StepFlops().as_tuple()), dtype=torch.float64)
    terms[4] = float(stop_requested)
    tp0 = parallel_state.get_tensor_model_parallel_rank() == 0
    if tp0 and parallel_state.is_pipeline_last_stage(ignore_virtual=True) and logs:
        total = torch.stack([x["lm loss"].detach().double().cpu() for x in logs]).sum(0)
        terms[0], terms[1] = total[0], total[1]
    if tp0 and parallel_state.is_pipeline_first_stage(ignore_virtual=True):
        seq = cfg.data.seq_length
        for b in batches:
            terms[2] += _sample_tokens(b, seq)
            terms[3] += int(b["num_samples"].sum())
            terms[5:] += torch.tensor(flops.batch_flops(b, trainable).as_tuple(), dtype=torch.float64)
    return terms


class Trainer:
    """State of one training run on this rank (see module docstring); ``run()`` trains."""

    def __init__(self, cfg: RunConfig, forward_step_func=forward_step):
        self.cfg = cfg
        self.forward_step_func = forward_step_func
        p = cfg.parallel
        self.chunks = build_model_chunks(cfg.model, p)
        c = cfg.checkpoint
        resume = ckpt.latest_checkpoint(c.load) if c.load else None
        if resume is None or c.weights_only or ckpt.read_meta(resume).get("weights_only"):
            init_weights(
                self.chunks, cfg.seed
            )  # a full checkpoint overwrites every weight: drawing is skipped
        apply_recompute(self.chunks, cfg.train.recompute, cfg.train.recompute_num_layers)
        self.loader = build_data_loader(cfg.data, cost_model=cost_model(cfg.model))
        self.flops = FlopsModel.from_config(cfg.model, cfg.train.recompute)
        self.peak = run_peak(cfg.model)
        self.thd = use_transformer_engine(cfg.model.transformer_impl)
        self.step = 0
        self.consumed = {"tokens": 0, "samples": 0}
        self.skipped = {"steps": 0, "samples": 0}
        self.nan_streak = 0
        self.losses: list[float] = []
        self.last_saved: str | None = None
        self.metrics = MetricsLogger(
            dist.get_rank() == 0,
            cfg.logging.dir,
            cfg.logging.wandb,
            cfg.logging.wandb_project,
            cfg.logging.wandb_run_name,
            config=to_dict(cfg),
            log_interval=cfg.train.log_interval,
        )
        self.run_state: StageRun | None = None
        self.stop = StopSignal()
        self._validation = None  # (stage index, its ValidationLoader or None)
        self.stop_agreed = False
        wandb_run_id = self._resume()
        self.metrics.open(self.step, wandb_run_id)
        self._stage_timer = (time.perf_counter(), self._stage_fraction(self.loader.position))

    # ---- stages and checkpoints ----
    def _enter_stage(self, index: int, fresh: bool) -> None:
        self.run_state = start_stage(self.cfg, self.chunks, index, self.step, previous=self.run_state)
        stage = self.run_state.stage
        self.metrics.print(
            f"[megasail] stage {index} '{stage.name}': trains {stage.trainable}; "
            + self.flops.describe(stage.trainable)
        )
        if fresh and stage.init_checkpoint:
            # the optimizer refreshes its fp32 main weights from the loaded ones (bf16 steps from those)
            ckpt.load_checkpoint(
                stage.init_checkpoint, self.run_state.model, self.run_state.optimizer, weights_only=True
            )
            self.metrics.print(
                f"[megasail] stage '{stage.name}' starts from the weights of {stage.init_checkpoint}"
            )

    def _guard_save_dir(self, start_step: int) -> None:
        """Refuse to write into a checkpoint.save directory that holds a later step than the one this run
        starts at: its saves would move ``latest`` backwards and keep_last would prune the wrong steps."""
        c = self.cfg.checkpoint
        later = ckpt.steps_after(c.save, start_step) if c.save else []
        if not later:
            return
        if not c.overwrite:
            raise StartupError(
                f"checkpoint.save={c.save} holds step {later[-1]} of an earlier run, later than this run's "
                f"start (step {start_step}): resume it with checkpoint.load={c.save}, or start over in a new "
                "directory, or set checkpoint.overwrite=true (moves its steps into a superseded_* subdirectory)"
            )
        if dist.get_rank() == 0:
            aside = ckpt.supersede(c.save)
            self.metrics.print(f"[megasail] checkpoint.overwrite: the earlier steps of {c.save} moved to {aside}")
        dist.barrier()

    def _warn_replanned_schedule(self, meta: dict) -> None:
        """A stage without budget decays over train.iters as planned when it started (megatron keeps the
        checkpoint's schedule too): say so when train.iters changed since."""
        r = self.run_state
        if r.clock.unit != "steps":
            return
        import yaml

        planned_iters = (yaml.safe_load(meta.get("config") or "{}") or {}).get("train", {}).get("iters")
        if planned_iters == self.cfg.train.iters:
            return
        planned = "until stopped" if planned_iters is None else f"to step {planned_iters}"
        now = "until stopped" if self.cfg.train.iters is None else f"to step {self.cfg.train.iters}"
        if self.cfg.optim.override_scheduler:
            self.metrics.print(f"[megasail] stage '{r.stage.name}': schedule re-planned from {planned} {now} "
                               "(optim.override_scheduler)")
        else:
            self.metrics.print(
                f"[megasail] WARNING: stage '{r.stage.name}' has no budget; its learning rate was planned to decay "
                f"{planned} and keeps that plan ({now} now: steps past the plan run at min_lr). Set "
                "optim.override_scheduler=true to re-plan the decay over the new train.iters"
            )

    def _resume(self) -> str | None:
        """Load checkpoint.load (or start fresh); returns the wandb run id to continue, if any."""
        c = self.cfg.checkpoint
        path = ckpt.latest_checkpoint(c.load) if c.load else None
        if c.load and path is None:
            if c.load != c.save:
                raise StartupError(
                    f"checkpoint.load={c.load}: no checkpoint there (no "
                    f"{ckpt.MARKER} and no iter_* directory)"
                )
            self.metrics.print(f"[megasail] no checkpoint in {c.load} yet: starting from the initial weights")
        # a weights-only checkpoint (e.g. converted from HuggingFace) starts a fresh run from its weights
        weights_only = c.weights_only or (path is not None and bool(ckpt.read_meta(path).get("weights_only")))
        if path is None or weights_only:
            self._guard_save_dir(0)
            self._enter_stage(self.loader.position.stage, fresh=path is None)
            if path is not None:
                ckpt.load_checkpoint(path, self.run_state.model, self.run_state.optimizer, weights_only=True)
                self.metrics.print(
                    f"[megasail] weights from {path}; fresh optimizer, schedule and data position"
                )
            return None
        meta = ckpt.read_meta(path)
        self._guard_save_dir(int(meta["iteration"]))
        self.step = int(meta["iteration"])
        self.run_state = None
        self.run_state = start_stage(
            self.cfg, self.chunks, int(meta["stage"]["index"]), int(meta["stage_start_step"])
        )
        ckpt.load_checkpoint(path, self.run_state.model, self.run_state.optimizer, self.run_state.scheduler)
        self.loader.load_state_dict(meta["loader_state"])
        self.consumed = dict(meta.get("consumed", self.consumed))
        self.skipped = dict(meta.get("skipped", self.skipped))
        self.metrics.print(
            f"[megasail] resumed from {path} at step {self.step} (stage "
            f"'{self.run_state.stage.name}', loader at global batch {self.loader.position.global_batches})"
        )
        self._warn_replanned_schedule(meta)
        return meta.get("wandb_run_id")

    def _wandb_run_id(self) -> str | None:
        """Rank 0's wandb run id (rank 0 writes megasail.json; the others pass theirs along unused)."""
        return self.metrics.wandb_run_id

    def save(self) -> str:
        c, r = self.cfg.checkpoint, self.run_state
        meta = {
            "stage": {"index": r.index, "name": r.stage.name},
            "stage_iteration": self.step - r.start_step,
            "stage_start_step": r.start_step,
            "loader_state": self.loader.state_dict(),
            "config": to_yaml(self.cfg),
            "consumed": dict(self.consumed),
            "skipped": dict(self.skipped),
            "wandb_run_id": self._wandb_run_id(),
        }
        hooked = [m for m in r.model if getattr(m, "use_forward_hook", False)]
        for m in hooked:  # overlapped param gather: the optimizer's last update is not in the params yet
            m.disable_forward_pre_hook(param_sync=True)
        self.last_saved = ckpt.save_checkpoint(
            c.save,
            self.step,
            r.model,
            r.optimizer,
            r.scheduler,
            meta=meta,
            keep_last=c.keep_last,
            async_save=c.async_save,
            optimizer_sharding=c.optimizer_sharding,
        )
        for m in hooked:
            m.enable_forward_pre_hook()
        self.metrics.print(f"[megasail] saved {self.last_saved}")
        return self.last_saved

    # ---- one step ----
    def _schedule(self, batches: list[dict], forward_only: bool) -> list[dict]:
        """megatron's forward(-backward) schedule over this rank's micro-batches; the per-micro-batch logs."""
        r, cfg = self.run_state, self.cfg
        seq, mbs = cfg.data.seq_length, cfg.data.micro_batch_size
        if self.thd:  # THD flattens each micro-batch to one row: the stages exchange [mbs * s, 1, h]
            seq, mbs = seq * mbs, 1
        data = iter(batches) if len(r.model) == 1 else [iter(batches) for _ in r.model]
        return get_forward_backward_func()(
            forward_step_func=self.forward_step_func,
            data_iterator=data,
            model=r.model if len(r.model) > 1 else r.model[0],
            num_microbatches=len(batches),
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )

    def _validation_loader(self):
        """The current stage's validation loader (built on first use, on every rank), or None."""
        r = self.run_state
        if self._validation is None or self._validation[0] != r.index:
            self._close_validation()
            self._validation = (r.index, build_validation_loader(
                self.cfg.data, r.index, self.cfg.train.eval_iters, cost_model=cost_model(self.cfg.model)))
        return self._validation[1]

    def _close_validation(self) -> None:
        if self._validation is not None and self._validation[1] is not None:
            self._validation[1].close()
        self._validation = None

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Loss on the current stage's validation_sources (train.eval_iters global batches, the same ones
        at every evaluation; token-weighted over all ranks), or None when the stage has none."""
        val = self._validation_loader()
        if val is None:
            return None
        r = self.run_state
        for m in r.model:
            m.eval()
        total = torch.zeros(2, dtype=torch.float64)
        steps = 0
        for batches in val:  # each step a collective over the model-parallel group, before the schedule
            logs = self._schedule(batches, forward_only=True)
            total += _step_terms(batches, logs, self.cfg, self.flops, r.stage.trainable)[:2]
            steps += 1
        for m in r.model:
            m.train()
        total = total.to(_device())
        dist.all_reduce(total)  # loss sums from the last pipeline stage of every data-parallel replica
        loss_sum, loss_tokens = total.tolist()
        loss = loss_sum / max(loss_tokens, 1.0)
        coverage = val.coverage
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50.0)),
            "val_loss_tokens": int(loss_tokens),
            "val_samples": int(coverage.get("samples", 0) or 0),
            "val_steps": steps,
        }

    def _stage_fraction(self, position) -> float | None:
        r = self.run_state
        if r is None or not math.isfinite(r.clock.total) or position.stage != r.index:
            return None
        return min(r.clock.progress(position) / r.clock.total, 1.0)

    def train_step(self) -> dict | None:
        """One optimizer step; None when the data (the last stage's budget) has ended."""
        before = self.loader.position
        if before.finished:
            return None
        if before.stage != self.run_state.index:
            self._enter_stage(before.stage, fresh=True)
            self._stage_timer = (time.perf_counter(), 0.0)
        r = self.run_state
        start = time.perf_counter()
        try:
            batches = self.loader.next_step()
        except StopIteration:
            return None
        after = self.loader.position
        loss_sum, loss_tokens, tokens, samples, step_flops = self._forward_backward(batches)
        loss = loss_sum / max(loss_tokens, 1.0)
        # the step runs at the schedule's lr at the end of its data (its first step above 0); the data is
        # spent whether or not the update happens
        r.scheduler.advance(r.clock.increment(before, after))
        lr = float(r.optimizer.param_groups[0]["lr"])
        updated, grad_norm, overflow = False, float("nan"), False
        if math.isfinite(loss):
            updated, grad_norm, overflow = optimizer_step(r.optimizer)
        slowest, fastest = _slowest_and_fastest(time.perf_counter() - start)
        self._count_step(int(tokens), int(samples), updated, overflow)
        metrics = {
            "step": self.step,
            "stage": r.stage.name,
            "stage_index": r.index,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "updated": updated,
            "tokens": int(tokens),
            "samples": int(samples),
            "loss_tokens": int(loss_tokens),
            "consumed_tokens": self.consumed["tokens"],
            "consumed_samples": self.consumed["samples"],
            "step_time": slowest,
            "tokens_per_s": tokens / slowest,
            **step_metrics(step_flops, slowest, dist.get_world_size(), self.peak),  # TFLOP/s, mfu, hfu
            "mem_gb": memory_gb(),
            "skipped_steps": self.skipped["steps"],
            "skipped_samples": self.skipped["samples"],
            "step_time_spread": slowest / fastest if fastest > 0 else 1.0,
            "loader": self.loader.statistics(),
        }
        stage_ended = after.stage != before.stage or after.finished
        interval = self.cfg.train.eval_interval
        if interval and (self.step % interval == 0 or stage_ended):
            metrics.update(self.evaluate() or {})
        self.losses.append(loss)
        self._log_step(metrics, before, after)
        if not updated and not overflow:
            self._check_divergence(loss, grad_norm)
        return metrics

    def _forward_backward(self, batches) -> tuple[float, float, float, float, StepFlops]:
        """The schedule over one step's micro-batches, and its sums over every rank: (loss sum, loss
        tokens, sample tokens, samples, FLOPs). A SIGTERM seen on any rank rides along (stop_agreed)."""
        r = self.run_state
        for m in r.model:
            m.zero_grad_buffer()
        r.optimizer.zero_grad()
        logs = self._schedule(batches, forward_only=False)
        terms = _step_terms(batches, logs, self.cfg, self.flops, r.stage.trainable, self.stop.requested)
        terms = terms.to(_device())
        dist.all_reduce(terms)
        loss_sum, loss_tokens, tokens, samples, stops = terms[:5].tolist()
        self.stop_agreed = stops > 0
        return loss_sum, loss_tokens, tokens, samples, StepFlops(*terms[5:].tolist())

    def _count_step(self, tokens: int, samples: int, updated: bool, overflow: bool) -> None:
        """The run's step, consumed and skipped counters, and the streak of non-finite steps."""
        self.step += 1
        self.consumed["tokens"] += tokens
        self.consumed["samples"] += samples
        # an fp16 loss-scale overflow is routine (skipped, counted, but not a sign of divergence)
        self.nan_streak = 0 if updated or overflow else self.nan_streak + 1
        if not updated:
            self.skipped["steps"] += 1
            self.skipped["samples"] += samples

    def _log_step(self, metrics: dict, before, after) -> None:
        """metrics.jsonl and the console line (stage progress and ETA), and the validation line."""
        fraction = self._stage_fraction(after) if after.stage == before.stage else 1.0
        t0, f0 = self._stage_timer
        eta = None
        if fraction is not None and fraction > f0:
            eta = (time.perf_counter() - t0) / (fraction - f0) * (1.0 - fraction)
        self.metrics.log(metrics, fraction, eta)
        if "val_loss" in metrics:
            self.metrics.print(
                f"validation | step {self.step:>6} | {self.run_state.stage.name} | "
                f"loss {metrics['val_loss']:.4f} | ppl {metrics['val_ppl']:.3f} | {metrics['val_samples']} samples, "
                f"{metrics['val_loss_tokens']} loss tokens"
            )

    def _check_divergence(self, loss: float, grad_norm: float) -> None:
        log.warning(
            "step %d skipped: loss %s, gradient norm %s (%d in a row)",
            self.step,
            loss,
            grad_norm,
            self.nan_streak,
        )
        if self.nan_streak < self.cfg.train.max_nan_steps:
            return
        save = self.cfg.checkpoint.save
        good = ckpt.latest_checkpoint(save) if save else None
        where = (
            f"go back to {good} (checkpoint.load={save}) and lower the learning rate or skip the data"
            if good
            else "no checkpoint was saved yet: restart from the initial weights with changed settings"
        )
        raise TrainingDiverged(
            f"{self.nan_streak} consecutive steps with a non-finite loss or gradient norm "
            f"(last at step {self.step}, train.max_nan_steps={self.cfg.train.max_nan_steps}); "
            f"{where}"
        )

    # ---- the run ----
    def run(self) -> dict:
        cfg, c = self.cfg, self.cfg.checkpoint
        last = None
        try:
            with self.stop:
                while cfg.train.iters is None or self.step < cfg.train.iters:
                    stage_before = self.loader.position.stage
                    metrics = self.train_step()
                    if metrics is None:
                        break
                    last = metrics
                    ckpt.finalize_async_saves(blocking=False)
                    if self.stop_agreed:
                        self.metrics.print(f"[megasail] SIGTERM: stopping after step {self.step}")
                        break
                    stage_ended = self.loader.position.stage != stage_before or self.loader.position.finished
                    if c.save and ((c.interval and self.step % c.interval == 0) or stage_ended):
                        self.save()
                if (
                    c.save
                    and last is not None
                    and (self.last_saved is None or not self.last_saved.endswith(f"{self.step:07d}"))
                ):
                    self.save()
        except TrainingDiverged:
            ckpt.finalize_async_saves(blocking=True)  # a save in flight still publishes (every rank raises)
            raise
        finally:
            self.metrics.close()
            self._close_validation()
        ckpt.finalize_async_saves(blocking=True)
        return {
            "step": self.step,
            "losses": list(self.losses),
            "stage": self.run_state.stage.name,
            "stage_index": self.run_state.index,
            "finished": self.loader.position.finished,
            "skipped_steps": self.skipped["steps"],
            "consumed": dict(self.consumed),
            "checkpoint": self.last_saved,
            "last_metrics": last,
            "stopped_by_signal": self.stop_agreed,
        }


def _record_config(cfg: RunConfig) -> None:
    """The resolved config (unset values adopted from the manifests) in the log and LOGGING_DIR/config.yaml."""
    text = to_yaml(cfg)
    if not cfg.logging.dir:
        log.info("resolved config (set logging.dir to keep it in LOGGING_DIR/config.yaml):\n%s", text)
        return
    os.makedirs(cfg.logging.dir, exist_ok=True)
    path = os.path.join(cfg.logging.dir, "config.yaml")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    log.info("resolved config: %s", path)
    log.debug("resolved config:\n%s", text)


def pretrain(cfg: RunConfig, *, forward_step_func=forward_step) -> dict:
    """Train ``cfg`` on this process's rank (torchrun's environment, or a single process).

    Runs start-up checks (``checks.check_run``; unset tokenizer-dependent values come from the
    dataset manifests), sets up process groups, builds and initialises the model, resumes from
    ``checkpoint.load`` if given, trains until ``train.iters`` or the end of the last stage, saves
    to ``checkpoint.save``. Returns a summary: final step, per-step losses, stage, checkpoint.
    The caller tears down the process groups (``megasail.runtime.destroy``).
    """
    cfg = copy.deepcopy(cfg)
    init_process_group(cfg.train.timeout_minutes)
    check_run(cfg, dist.get_world_size())
    p = cfg.parallel
    initialize(
        p.tensor,
        p.pipeline,
        p.virtual_pipeline,
        p.context,
        seed=cfg.seed,
        timeout_minutes=cfg.train.timeout_minutes,
    )
    if dist.get_rank() == 0:
        _record_config(cfg)
    trainer = Trainer(cfg, forward_step_func)
    if dist.get_rank() == 0:
        print(
            f"[megasail] world {dist.get_world_size()}: tp={p.tensor} pp={p.pipeline} "
            f"dp={parallel_state.get_data_parallel_world_size()} vpp={p.virtual_pipeline}; "
            f"{len(cfg.data.stages)} stage(s); train.iters={cfg.train.iters}",
            flush=True,
        )
    return trainer.run()
