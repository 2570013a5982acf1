"""The CUDA production path: Transformer Engine layers equal the local layers, and a training step
runs on the GPU. Marked `gpu`: skipped on machines without CUDA (CI's CPU machines)."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed_test
from model_utils import multimodal_batch, tiny_hf_model, tiny_model_config

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]


def _te_matches_local(rank, world_size):
    from megasail.convert.hf_internvl import hf_to_megasail, to_te_layout
    from megasail.models.sail_vl import SailVLModel
    from megasail.runtime import initialize

    initialize(1, 1, seed=0)
    local_cfg = tiny_model_config(-1, transformer_impl="local")
    te_cfg = tiny_model_config(-1, transformer_impl="te")
    weights = hf_to_megasail(tiny_hf_model(-1).state_dict(), local_cfg)
    local = SailVLModel(local_cfg).cuda().eval()
    local.load_state_dict(weights)
    te = SailVLModel(te_cfg).cuda().eval()
    missing, unexpected = te.load_state_dict(to_te_layout(weights), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    ids, positions, pixels = (t.cuda() for t in multimodal_batch(local_cfg, tiles_per_image=(1, 3)))
    with torch.no_grad():
        out_local = local(ids, positions, pixels)
        out_te = te(ids, positions, pixels)
    torch.testing.assert_close(out_te.float(), out_local.float(), rtol=1e-3, atol=1e-3)


def _have_te() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


@pytest.mark.skipif(not _have_te(), reason="needs Transformer Engine")
def test_transformer_engine_layers_match_local_layers():
    run_distributed_test(_te_matches_local, 1)


def _step_on_gpu(rank, world_size):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megasail.config import ParallelConfig
    from megasail.runtime import initialize
    from megasail.training import build_model_chunks, forward_step, reported_loss, wrap_ddp

    initialize(1, 1, seed=0)
    cfg = tiny_model_config(-1, precision="bf16")
    chunks = build_model_chunks(cfg, ParallelConfig())
    assert all(p.is_cuda for p in chunks[0].parameters())  # plain-torch params moved too
    wrapped = wrap_ddp(chunks, ParallelConfig())
    ids, positions, pixels = multimodal_batch(cfg, tiles_per_image=(1, 2), seq_length=64)
    batch = {"input_ids": ids, "position_ids": positions, "labels": ids.roll(-1, 1),
             "loss_mask": torch.ones(ids.shape), "pixel_values": pixels.bfloat16(), "attention_mask": None}
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]),  # CPU batch
                                         model=wrapped[0], num_microbatches=1, seq_length=64, micro_batch_size=2,
                                         forward_only=False)
    assert torch.isfinite(torch.tensor(reported_loss(losses)))


def test_training_step_runs_on_gpu():
    run_distributed_test(_step_on_gpu, 1)
