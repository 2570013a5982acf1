"""The loader on TP/PP ranks: read once per model-parallel group, send each stage what it needs.

Only the first pipeline stage's tensor-parallel rank 0 of each data-parallel replica reads and
decodes (a `MultimodalDataLoader`). It sends the token-side fields (no pixels, no input_ids) to
the later stages' TP rank 0 over the pipeline group, and each stage's TP rank 0 sends its stage's
fields over its TP group. No rank makes an attention mask: every stage gets cu_seqlens, from which
the forward step builds the block-causal mask on the training device where the layers need one
(`megasail.training.step.packed_attention`; Transformer Engine THD reads cu_seqlens itself).

Fetching is a collective over the pipeline and tensor-parallel groups, so it must happen outside
megatron's pipeline schedule: call `loader.next_step(num_microbatches)` once per optimizer step,
before `get_forward_backward_func()`, and hand the schedule the fetched list:

    batches = loader.next_step(num_microbatches)           # every rank of the model-parallel group
    forward_backward(forward_step_func=forward_step,
                     data_iterator=iter(batches),          # VPP: [iter(batches) for _ in model_chunks]
                     model=model, num_microbatches=len(batches), ...)

Never give the schedule the loader itself (`data_iterator=loader`): in 1F1B, stages >= 1 wait in
recv_forward before their first forward_step while stage 0's forward_step would wait in the
loader's broadcast over the pipeline group, a deadlock; the interleaved schedule also calls
next() once per (chunk, micro-batch) in an order that differs between ranks.

Fields per pipeline stage (others are None):
    first: input_ids, position_ids, pixel_values, cu_seqlens, num_samples
    middle: position_ids, cu_seqlens, num_samples
    last: labels, loss_mask, position_ids, cu_seqlens, num_samples
    (a single stage is both first and last)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megasail.data.loader.config import DataConfig, StageConfig
from megasail.data.loader.data_loader import MultimodalDataLoader, fetch_step
from megasail.data.loader.state import LoaderPosition, position_from_state, position_state

ALL_STAGES = ("position_ids", "cu_seqlens", "num_samples")
FIRST_STAGE = ("input_ids", "pixel_values")
LAST_STAGE = ("labels", "loss_mask")


def stage_fields(is_first: bool, is_last: bool) -> tuple[str, ...]:
    """Batch keys a pipeline stage receives."""
    return ALL_STAGES + (FIRST_STAGE if is_first else ()) + (LAST_STAGE if is_last else ())


def broadcast_tensors(batch: dict | None, keys: tuple[str, ...], extra, src: int, group) -> tuple[dict, object]:
    """Broadcast batch[key] for keys (tensors or None) plus a small picklable `extra` from rank src.

    Returns (dict of the keys, extra) on every rank of the group; shapes and dtypes travel first.
    """
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    header = [None]
    if dist.get_rank() == src:
        header = [({k: None if batch is None or batch[k] is None else (tuple(batch[k].shape), batch[k].dtype) for k in keys}, extra)]
    dist.broadcast_object_list(header, src=src, group=group)
    shapes, extra = header[0]
    out = {}
    for key in keys:
        if shapes[key] is None:
            out[key] = None
            continue
        shape, dtype = shapes[key]
        tensor = batch[key].to(device).contiguous() if dist.get_rank() == src else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=src, group=group)
        out[key] = tensor
    return out, extra


class ModelParallelDataLoader:
    """Micro-batches for this rank's TP/PP/DP position (see module docstring).

    Same interface as MultimodalDataLoader: next_step, iteration, state_dict/load_state_dict,
    current_stage, trainable_modules, statistics (the reader's counters, sent to the other ranks of
    its group).

    IMPORTANT (pipeline parallelism): every fetch is a collective over the pipeline group. Fetch a
    whole optimizer step with `next_step(num_microbatches)` BEFORE running the pipeline schedule,
    on every rank, and pass `data_iterator=iter(batches)` (with virtual pipeline stages
    `[iter(batches) for _ in model_chunks]`) to `get_forward_backward_func()`. Passing the loader
    as the schedule's data iterator deadlocks at PP > 1 (see the module docstring).
    """

    def __init__(self, config: DataConfig, cost_model=None, make_reader=None):
        """make_reader(dp_rank, dp_size): the reading rank's reader (an object with __next__ (one
        micro-batch dict), mid_global_batch, position and statistics()); None = MultimodalDataLoader
        over `config` (the validation loader passes its own)."""
        from megatron.core import parallel_state as ps

        self.config = config
        self.is_first = ps.is_pipeline_first_stage(ignore_virtual=True)
        self.is_last = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.tp_src, self.tp_group = ps.get_tensor_model_parallel_src_rank(), ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_src = ps.get_pipeline_model_parallel_first_rank()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.reads_data = self.is_first and self.tp_rank == 0
        self.reader = None
        if self.reads_data:
            if make_reader is None:
                def make_reader(dp_rank, dp_size):
                    return MultimodalDataLoader(config, dp_rank, dp_size, cost_model=cost_model)
            self.reader = make_reader(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        config.validate()
        self.dp_size = ps.get_data_parallel_world_size()
        config.check_data_parallel(self.dp_size)
        self._position = LoaderPosition()
        self._mid_global_batch = False
        self._statistics: dict = {}

    @property
    def microbatches_per_step(self) -> int:
        """Micro-batches of one optimizer step on this rank: global_batch_size / (micro_batch_size x DP)."""
        return self.config.global_batch_size // (self.config.micro_batch_size * self.dp_size)

    def next_step(self, num_microbatches: int | None = None) -> list[dict]:
        """All micro-batches of the next optimizer step (one global batch), fetched before the schedule.

        Call on every rank of the model-parallel group, outside the pipeline schedule, then give the
        schedule `iter(batches)` (one per model chunk with virtual pipeline stages).
        num_microbatches must be `microbatches_per_step` (None = that). Raises StopIteration when
        the curriculum has ended.
        """
        return fetch_step(self, self._fetch, num_microbatches)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        """One micro-batch; a collective over the model-parallel group, so never call it from inside the
        pipeline schedule (use next_step)."""
        return self._fetch()

    def _fetch(self) -> dict:
        batch, meta = None, None
        if self.reader is not None:
            try:
                batch = next(self.reader)
                mid = self.reader.mid_global_batch
                # statistics travel once per global batch, so every rank (the logging one too) has them
                meta = (self.reader.position, mid, None if mid else self.reader.statistics())
            except StopIteration:
                meta = None
        keys = ALL_STAGES + LAST_STAGE
        if self.pp_size > 1 and self.tp_rank == 0:  # later stages' TP rank 0 get the token-side fields
            got, meta = broadcast_tensors(batch, keys, meta, self.pp_src, self.pp_group)
            if not self.is_first:
                batch = got
        mine = stage_fields(self.is_first, self.is_last)
        if self.tp_size > 1:
            batch, meta = broadcast_tensors(batch, mine, meta, self.tp_src, self.tp_group)
        if meta is None:
            raise StopIteration
        self._position, self._mid_global_batch, statistics = meta
        if statistics is not None:
            self._statistics = statistics
        return {key: batch.get(key) if key in mine else None for key in ALL_STAGES + FIRST_STAGE + LAST_STAGE}

    @property
    def position(self) -> LoaderPosition:
        return self._position

    @property
    def current_stage(self) -> StageConfig:
        return self.config.stages[self._position.stage]

    @property
    def trainable_modules(self) -> list[str]:
        return list(self.current_stage.trainable)

    def state_dict(self) -> dict:
        if self._mid_global_batch:
            raise RuntimeError("loader state is defined between global batches (save after the optimizer step)")
        return position_state(self._position, self.config)

    def load_state_dict(self, state: dict) -> None:
        self._position = position_from_state(state, self.config)
        self._mid_global_batch = False
        if self.reader is not None:
            self.reader.load_state_dict(state)

    def statistics(self) -> dict:
        """The reader's counters (this DP replica's), as of the last completed global batch on other ranks."""
        return self.reader.statistics() if self.reader is not None else dict(self._statistics)


def build_data_loader(config: DataConfig, cost_model=None) -> ModelParallelDataLoader:
    """The loader for this rank, from megatron's parallel_state (call after megasail.runtime.initialize)."""
    return ModelParallelDataLoader(config, cost_model=cost_model)
