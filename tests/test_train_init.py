"""Initial weights depend on the seed and each parameter's global name only: TP=2 shards equal slices
of the TP=1 tensors, bit for bit (megatron's qkv groups and SwiGLU [gate; up] layout included)."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed_test

from megasail.training.init import tp_shard

pytestmark = [pytest.mark.distributed]


def _init(rank, world_size, tp, out):
    from megasail.config import load_config
    from megasail.runtime import initialize
    from megasail.training.init import global_names, init_weights
    from megasail.training.model_builder import build_model_chunks

    # a vocabulary of several init blocks, so shards start inside and across blocks
    cfg = load_config(
        None,
        [
            f"parallel.tensor={tp}",
            "model.language.vocab_size=1280",
            "model.precision=fp32",
            "model.transformer_impl=local",
            "model.vision.num_layers=1",
            "model.vision.hidden_size=64",
            "model.vision.num_attention_heads=4",
            "model.vision.ffn_hidden_size=128",
            "model.language.num_layers=2",
            "model.language.hidden_size=64",
            "model.language.num_attention_heads=4",
            "model.language.num_query_groups=2",
            "model.language.ffn_hidden_size=96",
        ],
    )
    initialize(tp, 1, seed=100 + rank)  # megatron's own streams differ per run: the result must not
    chunks = build_model_chunks(cfg.model, cfg.parallel)
    init_weights(chunks, seed=5)
    names = global_names(chunks[0])
    torch.save(
        {names[k]: v.detach().clone() for k, v in chunks[0].named_parameters()}, f"{out}/{tp}_{rank}.pt"
    )


def test_tensor_parallel_shards_are_slices_of_the_unsplit_initial_weights(tmp_path):
    """Fails if a rank draws its shard from its own stream (megatron's default) or a slice is misplaced
    (e.g. fc1 split as [gate_0, gate_1] instead of [gate_r; up_r])."""
    run_distributed_test(_init, 1, 1, str(tmp_path))
    run_distributed_test(_init, 2, 2, str(tmp_path))
    full = torch.load(tmp_path / "1_0.pt", weights_only=True)
    random = 0
    for rank in (0, 1):
        shard = torch.load(tmp_path / f"2_{rank}.pt", weights_only=True)
        assert set(shard) == set(full)
        for key, value in shard.items():
            torch.testing.assert_close(value, tp_shard(key, full[key], rank, 2), rtol=0, atol=0, msg=key)
            random += int(value.std() > 0) if value.numel() > 1 else 0
    assert random > 10
