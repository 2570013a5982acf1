"""Freezing before DDP: frozen parts get no grad buffer and no optimizer state, and stay bitwise unchanged."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed_test
from model_utils import multimodal_batch, tiny_model_config

pytestmark = [pytest.mark.distributed]


def _freeze_projector_only(rank, world_size):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megasail.config import ParallelConfig
    from megasail.runtime import initialize
    from megasail.training import build_model_chunks, forward_step, freeze, wrap_ddp

    initialize(1, 1, seed=3)
    cfg = tiny_model_config(-1)
    parallel = ParallelConfig(distributed_optimizer=True)
    chunks = build_model_chunks(cfg, parallel)
    freeze(chunks, ["projector"])
    before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    wrapped = wrap_ddp(chunks, parallel)

    n_projector = sum(p.numel() for p in chunks[0].projector.parameters())
    buffer_numel = sum(buf.grad_data.numel() for buf in wrapped[0].buffers)
    assert n_projector <= buffer_numel < n_projector + 64 * len(wrapped[0].buffers)  # bucket padding only
    for name, p in chunks[0].named_parameters():
        assert hasattr(p, "main_grad") == name.startswith("projector."), name

    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), wrapped)
    n_opt = sum(p.numel() for group in opt.param_groups for p in group["params"])
    assert n_opt == n_projector  # optimizer state exists for the trainable part only

    ids, positions, pixels = multimodal_batch(cfg, tiles_per_image=(1, 2), seq_length=64, batch=2)
    batch = {"input_ids": ids, "position_ids": positions, "labels": torch.roll(ids, -1, 1),
             "loss_mask": torch.ones(ids.shape), "pixel_values": pixels, "attention_mask": None}
    wrapped[0].zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=wrapped[0],
                                num_microbatches=1, seq_length=64, micro_batch_size=2, forward_only=False)
    ok, _, _ = opt.step()
    assert ok
    for name, p in chunks[0].named_parameters():
        if name.startswith("projector."):
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"


def test_freeze_before_ddp_trains_only_the_projector():
    run_distributed_test(_freeze_projector_only, 1)


def test_freeze_rejects_unknown_part():
    from megasail.training.model_builder import freeze

    with pytest.raises(ValueError, match="unknown trainable parts"):
        freeze([], ["llm"])
