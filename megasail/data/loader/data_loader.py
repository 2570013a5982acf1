"""MultimodalDataLoader: one data-parallel rank's micro-batches, global batch after global batch.

    loader = MultimodalDataLoader(config.data, dp_rank=1, dp_size=8)
    batches = loader.next_step()    # the micro-batches of one optimizer step (one global batch)
    state = loader.state_dict()     # between global batches; restores at any DP size

On TP/PP ranks use `build_data_loader` (model_parallel.py). How a global batch is planned,
balanced and built: docs/loader.md.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial

import torch

from megasail.data.images import decode
from megasail.data.loader.balance import DEFAULT_COST_PRESET, SequenceCostModel, assign_to_ranks, imbalance
from megasail.data.loader.config import DataConfig, StageConfig
from megasail.data.loader.curriculum import Curriculum
from megasail.data.loader.state import LoaderPosition, position_from_state, position_state
from megasail.data.loader.worker import (
    BuiltMicroBatch,
    MicroBatchBuilder,
    MicroBatchPlan,
    init_worker,
    worker_start_method,
)

_SUMMED = ("sequences", "samples", "images", "tiles", "tokens", "slots", "bad_images_corrupt",
           "bad_images_too_large", "bad_samples", "replaced_samples", "unreplaced_samples", "build_seconds")
RECENT_BAD_SAMPLES = 32  # bad samples kept (with source and index) in statistics()


def micro_batch_plans(curriculum: Curriculum, position: LoaderPosition, dp_rank: int, dp_size: int,
                      cost_model: SequenceCostModel | None, imbalance_log: list | None = None
                      ) -> Iterator[MicroBatchPlan]:
    """This rank's micro-batch plans from `position` on, until the curriculum ends."""
    data = curriculum.data
    while not position.finished:
        sequences, after = curriculum.global_batch(position)
        if cost_model is not None:
            costs = cost_model.costs(sequences, data.seq_length)
            ranks = assign_to_ranks(costs, dp_size, balance=True)
            if imbalance_log is not None:
                imbalance_log.append(imbalance(costs, ranks))
                del imbalance_log[:-1024]  # keep the recent ones
        else:
            ranks = assign_to_ranks([0.0] * len(sequences), dp_size, balance=False)
        mine = [sequences[i] for i in ranks[dp_rank]]
        count = len(mine) // data.micro_batch_size
        for m in range(count):
            chunk = tuple(mine[m * data.micro_batch_size : (m + 1) * data.micro_batch_size])
            yield MicroBatchPlan(chunk, position.stage, position.global_batches, m,
                                 after if m == count - 1 else None)
        position = after


class _PlanSampler(torch.utils.data.Sampler):
    """Feeds micro-batch plans to the DataLoader (which passes each to MicroBatchBuilder.__getitem__)."""

    def __init__(self, plans: Iterator[MicroBatchPlan]):
        self.plans = plans

    def __iter__(self):
        return self.plans


def fetch_step(loader, fetch_one, num_microbatches: int | None = None) -> list[dict]:
    """One optimizer step's micro-batches from ``fetch_one()``, checked against the loader's step size.

    ``loader`` has ``microbatches_per_step``, ``config``, ``dp_size`` and ``_mid_global_batch``.
    """
    expected = loader.microbatches_per_step
    if num_microbatches is None:
        num_microbatches = expected
    if num_microbatches != expected:
        raise ValueError(
            f"next_step({num_microbatches}): one optimizer step is {expected} micro-batches on this rank "
            f"(global_batch_size {loader.config.global_batch_size} / micro_batch_size "
            f"{loader.config.micro_batch_size} / data-parallel size {loader.dp_size})"
        )
    if loader._mid_global_batch:
        raise RuntimeError("next_step() called inside a global batch (after single next() calls)")
    batches = []
    for _ in range(num_microbatches):
        try:
            batches.append(fetch_one())
        except StopIteration:
            if batches:
                raise RuntimeError(f"data ended after {len(batches)} of {num_microbatches} micro-batches "
                                   "of an optimizer step") from None
            raise
    return batches


class MultimodalDataLoader:
    """Micro-batches of one data-parallel rank (see module docstring).

    Args:
        config: DataConfig (validated here).
        dp_rank, dp_size: this rank's data-parallel position.
        cost_model: prices sequences for DP balancing; None prices by the default model's preset
            (DEFAULT_COST_PRESET); a training run passes its own model's.
    """

    def __init__(self, config: DataConfig, dp_rank: int = 0, dp_size: int = 1,
                 cost_model: SequenceCostModel | None = None):
        config.validate()
        config.check_data_parallel(dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_size - 1}")
        self.config, self.dp_rank, self.dp_size = config, dp_rank, dp_size
        if config.balance_dp and cost_model is None:
            cost_model = SequenceCostModel.from_preset(DEFAULT_COST_PRESET)
        self.cost_model = cost_model if config.balance_dp else None
        self.curriculum = Curriculum(config)
        sources = [[(s.prefix, s.display_name) for s in stage.sources] for stage in config.stages]
        self.builder = MicroBatchBuilder(config, sources)
        self._position = LoaderPosition()
        self._mid_global_batch = False
        self._iterator = None
        self._imbalances: list[float] = []
        self._totals: Counter = Counter()
        self._backend_counts: Counter = Counter()
        self._recent_bad: list[dict] = []
        self._started: float | None = None

    # ---- iteration ----
    def _make_iterator(self):
        plans = micro_batch_plans(self.curriculum, self._position, self.dp_rank, self.dp_size,
                                  self.cost_model, self._imbalances)
        workers = self.config.num_workers
        start, init = None, None
        if workers:  # workers die with this process; spawned ones (GPU decode) take its current device
            start = worker_start_method(self.config.worker_start, self.config.decode_backend)
            device = torch.cuda.current_device() if start != "fork" and torch.cuda.is_available() else None
            init = partial(init_worker, start, device, os.getpid(),
                           threading.current_thread() is threading.main_thread())
        return iter(torch.utils.data.DataLoader(
            self.builder, sampler=_PlanSampler(plans), batch_size=None, collate_fn=_identity,
            num_workers=workers, prefetch_factor=self.config.prefetch_factor if workers else None,
            persistent_workers=False, multiprocessing_context=start, worker_init_fn=init,
        ))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            if self._position.finished:
                raise StopIteration
            self._iterator = self._make_iterator()
        if self._started is None:
            self._started = time.perf_counter()
        built: BuiltMicroBatch = next(self._iterator)
        self._record(built)
        plan = built.plan
        self._mid_global_batch = plan.position_after is None
        if plan.position_after is not None:
            self._position = plan.position_after
        return built.batch

    @property
    def microbatches_per_step(self) -> int:
        """Micro-batches of one optimizer step on this rank: global_batch_size / (micro_batch_size x dp_size)."""
        return self.config.global_batch_size // (self.config.micro_batch_size * self.dp_size)

    def next_step(self, num_microbatches: int | None = None) -> list[dict]:
        """All micro-batches of the next optimizer step (one global batch); None = microbatches_per_step.

        Same call as `ModelParallelDataLoader.next_step`, so a training loop fetches a step the same
        way with and without model parallelism. Raises StopIteration when the curriculum has ended.
        """
        return fetch_step(self, lambda: next(self), num_microbatches)

    def _record(self, built: BuiltMicroBatch) -> None:
        for key in _SUMMED:
            self._totals[key] += built.stats[key]
        self._backend_counts.update(built.stats["decode_backend_counts"])
        self._recent_bad = (self._recent_bad + built.stats["bad_sample_log"])[-RECENT_BAD_SAMPLES:]

    def close(self) -> None:
        """Stop the worker processes; a later next() starts new ones at `position` (inside a global
        batch, that global batch starts over)."""
        self._iterator = None

    # ---- curriculum ----
    @property
    def position(self) -> LoaderPosition:
        """Where the next global batch starts."""
        return self._position

    @property
    def mid_global_batch(self) -> bool:
        """True while this rank has yielded part of a global batch (state_dict is not defined then)."""
        return self._mid_global_batch

    @property
    def current_stage(self) -> StageConfig:
        """The stage of the global batch in progress, or of the next one at a boundary."""
        return self.config.stages[self._position.stage]  # updated only when a global batch ends

    @property
    def trainable_modules(self) -> list[str]:
        """Modules the current stage trains (vision, projector, language): freeze the rest."""
        return list(self.current_stage.trainable)

    # ---- resume ----
    def state_dict(self) -> dict:
        """The position (global over DP ranks) and the data settings it is valid for."""
        if self._mid_global_batch:
            raise RuntimeError("loader state is defined between global batches; this rank is inside one "
                               "(save after the optimizer step)")
        return position_state(self._position, self.config)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position (any DP size); prefetched batches are discarded."""
        self._position = position_from_state(state, self.config)
        self._mid_global_batch = False
        self._iterator = None

    # ---- statistics ----
    def source_epochs(self) -> dict[str, int]:
        """Epoch each source of the current stage is in (derived from the position)."""
        plan = self.curriculum.plan(self._position.stage)
        epochs = plan.source_epochs(self._position.chunk)
        return {source.name: epoch for source, epoch in zip(plan.sources, epochs, strict=True)}

    def statistics(self) -> dict:
        """Counters for the training log: padding, bad data, throughput, decode backend, DP balance."""
        t = self._totals
        elapsed = time.perf_counter() - self._started if self._started is not None else 0.0
        return {
            "stage": self.current_stage.name,
            "global_batches": self._position.global_batches,
            "samples": t["samples"],
            "images": t["images"],
            "tiles": t["tiles"],
            "padding_fraction": 1.0 - t["tokens"] / t["slots"] if t["slots"] else 0.0,
            "skipped_images": t["bad_images_corrupt"] + t["bad_images_too_large"],
            "bad_images_corrupt": t["bad_images_corrupt"],
            "bad_images_too_large": t["bad_images_too_large"],
            "bad_samples": t["bad_samples"],
            "replaced_samples": t["replaced_samples"],
            "unreplaced_samples": t["unreplaced_samples"],
            "images_per_second": t["images"] / elapsed if elapsed > 0 else 0.0,
            "samples_per_second": t["samples"] / elapsed if elapsed > 0 else 0.0,
            "build_seconds": t["build_seconds"],
            "decode_backend": decode.resolve_backend(self.config.decode_backend),
            "decode_backend_counts": dict(self._backend_counts),
            "dp_imbalance_max": max(self._imbalances) if self._imbalances else 1.0,
            "source_epochs": self.source_epochs(),
            "recent_bad_samples": list(self._recent_bad),
        }


def _identity(item):
    return item
