"""Validation data: a stage's held-out prefixes (`StageConfig.validation_sources`), read like training
data (same packing, DP split and balancing, TP/PP fields per pipeline stage) in one fixed order that
every evaluation repeats, so validation losses are comparable across evaluations.

    val = build_validation_loader(cfg.data, stage_index, eval_iters)   # None: no validation_sources
    for batches in val:            # one evaluation: up to eval_iters steps, each like loader.next_step()
        forward_backward(..., data_iterator=iter(batches), num_microbatches=len(batches), forward_only=True)
    log(val.coverage)              # global_batches, samples, tokens, one_pass_samples, full_pass

An evaluation reads the first `eval_iters` global batches of the blended validation stream, and
stops early, never wrapping around, where that stream would draw a sample a second time (its last
global batch then padded with empty rows, as at the end of a training stage): no sample weighs twice
in a validation loss. `coverage` says what an evaluation covered. The plan is made once; workers
stay between evaluations (persistent; measured cheaper than restarting them, docs/loader.md). The
training loader's position and every RNG are left untouched (the workers are seeded from a private
generator).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from functools import partial

import numpy as np
import torch

from megasail.data.loader.balance import DEFAULT_COST_PRESET, SequenceCostModel
from megasail.data.loader.config import DataConfig, StageConfig
from megasail.data.loader.curriculum import Curriculum, open_nonempty, samples_before_repeat
from megasail.data.loader.data_loader import fetch_step, micro_batch_plans
from megasail.data.loader.state import LoaderPosition
from megasail.data.loader.worker import BuiltMicroBatch, MicroBatchBuilder, init_worker, worker_start_method


def validation_data_config(data: DataConfig, stage_index: int) -> DataConfig:
    """`data` with one stage: stage `stage_index`'s validation sources, no budget (the reader sets one)."""
    stage = data.stages[stage_index]
    if not stage.validation_sources:
        raise ValueError(f"data stage {stage.name!r} has no validation_sources")
    sources = [dataclasses.replace(s) for s in stage.validation_sources]
    held_out = StageConfig(name=f"{stage.name}/validation", sources=sources, trainable=list(stage.trainable))
    return dataclasses.replace(data, stages=[held_out], path=None)


def _built(item: BuiltMicroBatch) -> BuiltMicroBatch:
    return item  # the DataLoader's collate_fn: each item is one whole micro-batch already


class _FixedPlans(torch.utils.data.Sampler):
    """The same micro-batch plans at every pass (a DataLoader epoch is one evaluation)."""

    def __init__(self, plans: list):
        self.plans = plans

    def __iter__(self):
        return iter(self.plans)

    def __len__(self) -> int:
        return len(self.plans)


class ValidationReader:
    """One data-parallel rank's validation micro-batches (the reader of `ValidationLoader`; usable alone
    without model parallelism, like MultimodalDataLoader).

    Args:
        data: the run's DataConfig (its stages and loader settings).
        stage_index: whose validation_sources to read.
        eval_iters: global batches per evaluation (fewer when the validation data is shorter).
        dp_rank, dp_size, cost_model: as for MultimodalDataLoader.
    """

    def __init__(self, data: DataConfig, stage_index: int, eval_iters: int, dp_rank: int = 0, dp_size: int = 1,
                 cost_model: SequenceCostModel | None = None):
        if eval_iters < 1:
            raise ValueError(f"eval_iters must be >= 1, got {eval_iters}")
        config = validation_data_config(data, stage_index)
        config.validate()
        config.check_data_parallel(dp_size)
        held_out = config.stages[0]
        sizes = np.array([len(open_nonempty(s, held_out.name)) for s in held_out.sources], dtype=np.int64)
        weights = np.array([s.weight for s in held_out.sources], dtype=np.float64)
        held_out.budget_samples = samples_before_repeat(weights, sizes, config.pack_chunk_samples)
        self.config, self.dp_rank, self.dp_size, self.eval_iters = config, dp_rank, dp_size, eval_iters
        if config.balance_dp and cost_model is None:
            cost_model = SequenceCostModel.from_preset(DEFAULT_COST_PRESET)
        self.plans, last = [], LoaderPosition()
        plans = micro_batch_plans(Curriculum(config), LoaderPosition(), dp_rank, dp_size,
                                  cost_model if config.balance_dp else None)
        for plan in plans:  # one evaluation's plan, made once
            if plan.global_batch >= eval_iters:
                break
            self.plans.append(plan)
            last = plan.position_after or last
        self.coverage = {
            "global_batches": last.stage_batches,  # of this evaluation, <= eval_iters
            "samples": last.stage_samples,  # over all DP ranks; padding rows hold none
            "tokens": last.stage_tokens,
            "one_pass_samples": held_out.budget_samples,  # before any sample would repeat
            "full_pass": last.finished,  # the evaluation covers every one of them
        }
        self.builder = MicroBatchBuilder(config, [[(s.prefix, s.display_name) for s in held_out.sources]])
        self._loader = None
        self.reset()

    @property
    def microbatches_per_step(self) -> int:
        return self.config.global_batch_size // (self.config.micro_batch_size * self.dp_size)

    def reset(self) -> None:
        """The next micro-batch is the evaluation's first again (the workers are kept)."""
        self._iterator = None
        self._position = LoaderPosition()
        self._mid_global_batch = False

    def _data_loader(self) -> torch.utils.data.DataLoader:
        workers = self.config.num_workers
        start, init = None, None
        if workers:
            start = worker_start_method(self.config.worker_start, self.config.decode_backend)
            device = torch.cuda.current_device() if start != "fork" and torch.cuda.is_available() else None
            init = partial(init_worker, start, device, os.getpid(),
                           threading.current_thread() is threading.main_thread())
        return torch.utils.data.DataLoader(
            self.builder, sampler=_FixedPlans(self.plans), batch_size=None, collate_fn=_built,
            num_workers=workers, prefetch_factor=self.config.prefetch_factor if workers else None,
            persistent_workers=workers > 0, multiprocessing_context=start, worker_init_fn=init,
            generator=torch.Generator(),  # worker seeds drawn from it, not from the training RNG
        )

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """One micro-batch of the evaluation; StopIteration after its last."""
        if self._iterator is None:
            if self._loader is None:
                self._loader = self._data_loader()
            self._iterator = iter(self._loader)  # persistent workers restart the plan, not the processes
        built: BuiltMicroBatch = next(self._iterator)
        self._mid_global_batch = built.plan.position_after is None
        if built.plan.position_after is not None:
            self._position = built.plan.position_after
        return built.batch

    def next_step(self, num_microbatches: int | None = None) -> list[dict]:
        """The micro-batches of the evaluation's next global batch; StopIteration after its last."""
        return fetch_step(self, lambda: next(self), num_microbatches)

    @property
    def mid_global_batch(self) -> bool:
        return self._mid_global_batch

    @property
    def position(self) -> LoaderPosition:
        """Where the evaluation is (a position in the validation stream, not the training one)."""
        return self._position

    def statistics(self) -> dict:
        return dict(self.coverage)

    def close(self) -> None:
        """Stop the worker processes (a later evaluation starts new ones)."""
        self._loader = self._iterator = None


class ValidationLoader:
    """This rank's validation micro-batches at any TP/PP/DP layout (ModelParallelDataLoader's reading
    and broadcasting over a ValidationReader). Iterating it runs one evaluation from its start.

    Every rank of the model-parallel group must iterate it together (each step is a collective), before
    the pipeline schedule, as with the training loader's next_step.
    """

    def __init__(self, data: DataConfig, stage_index: int, eval_iters: int, cost_model=None):
        from megasail.data.loader.model_parallel import ModelParallelDataLoader

        self.stage_index, self.eval_iters = stage_index, eval_iters
        self._fetcher = ModelParallelDataLoader(
            validation_data_config(data, stage_index), make_reader=lambda dp_rank, dp_size: ValidationReader(
                data, stage_index, eval_iters, dp_rank, dp_size, cost_model))

    @property
    def microbatches_per_step(self) -> int:
        return self._fetcher.microbatches_per_step

    def reset(self) -> None:
        """The next step is the evaluation's first again."""
        if self._fetcher.reader is not None:
            self._fetcher.reader.reset()
        self._fetcher._position, self._fetcher._mid_global_batch = LoaderPosition(), False

    def next_step(self, num_microbatches: int | None = None) -> list[dict]:
        """The micro-batches of the evaluation's next step (fields per pipeline stage as in training);
        StopIteration on every rank after its last."""
        return self._fetcher.next_step(num_microbatches)

    def __iter__(self):
        """One evaluation: reset, then every step's micro-batch list."""
        self.reset()
        while True:
            try:
                yield self.next_step()
            except StopIteration:
                return

    @property
    def coverage(self) -> dict:
        """What one evaluation covers (ValidationReader.coverage); on ranks that do not read, known
        after the evaluation's first step."""
        return self._fetcher.statistics()

    def close(self) -> None:
        if self._fetcher.reader is not None:
            self._fetcher.reader.close()


def build_validation_loader(data: DataConfig, stage_index: int, eval_iters: int,
                            cost_model=None) -> ValidationLoader | None:
    """The validation loader of stage `stage_index` for this rank (after megasail.runtime.initialize),
    or None when the stage has no validation_sources."""
    if not data.stages[stage_index].validation_sources:
        return None
    return ValidationLoader(data, stage_index, eval_iters, cost_model=cost_model)
