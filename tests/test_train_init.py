"""Initial weights depend on the seed and each parameter's global name only: TP=2 shards equal slices
of the TP=1 tensors, bit for bit (megatron's qkv groups and SwiGLU [gate; up] layout included)."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed_test

from megasail.models.init import tp_shard

pytestmark = [pytest.mark.distributed]


def _init(rank, world_size, tp, out):
    from megasail.config import load_config
    from megasail.models.init import global_names, init_weights
    from megasail.runtime import initialize
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


def _foreign_linears(rank, world_size, out):
    """The tiny model's initial weights twice: as built (megatron's Column/RowParallelLinear and
    VocabParallelEmbedding) and with those modules re-classed to a class megatron's layer classes are not
    (as Transformer Engine's linears are not), their parameters untouched."""
    from megasail.config import load_config
    from megasail.models.init import init_weights
    from megasail.runtime import initialize
    from megasail.training.model_builder import build_model_chunks

    cfg = load_config(None, ["model.language.vocab_size=512", "model.precision=fp32", "model.transformer_impl=local",
                             "model.vision.num_layers=1", "model.vision.hidden_size=64",
                             "model.vision.num_attention_heads=4", "model.vision.ffn_hidden_size=128",
                             "model.language.num_layers=2", "model.language.hidden_size=64",
                             "model.language.num_attention_heads=4", "model.language.num_query_groups=2",
                             "model.language.ffn_hidden_size=96"])
    initialize(1, 1, seed=3)
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    results = {}
    for name in ("megatron", "foreign"):
        chunks = build_model_chunks(cfg.model, cfg.parallel)
        if name == "foreign":
            for module in chunks[0].modules():
                if isinstance(module, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
                    module.__class__ = type("ForeignLinear", (torch.nn.Module,), {})
        init_weights(chunks, seed=5)
        results[name] = {k: v.detach().clone() for k, v in chunks[0].named_parameters()}
    torch.save(results, out)


def test_initialisation_follows_the_parallel_attributes_not_the_layer_class(tmp_path):
    """Every megatron parallel weight carries tensor_model_parallel / partition_dim / partition_stride, whatever
    its class; Transformer Engine's linears are not megatron's ColumnParallelLinear/RowParallelLinear. With the
    tiny model's parallel layers re-classed to an unrelated module class, the initial weights are the same bit
    for bit (row-parallel weights still get megatron's scaled output-layer init).

    Fails if init_weights dispatches on the module class (a TE run stopped at NotImplementedError), or if
    the row-parallel rule is lost (partition_dim 1 drawn with init_method)."""
    out = tmp_path / "foreign.pt"
    run_distributed_test(_foreign_linears, 1, str(out))
    results = torch.load(out, weights_only=True)
    assert set(results["foreign"]) == set(results["megatron"])
    for key, value in results["megatron"].items():
        torch.testing.assert_close(results["foreign"][key], value, rtol=0, atol=0, msg=key)
    # megatron's inits: normal(0, 0.02) for column-parallel weights, scaled by 1 / sqrt(2 x 2 layers) for the
    # LLM's row-parallel ones (linear_proj, linear_fc2)
    for key, value in results["foreign"].items():
        if key.startswith("language_model.decoder.layers.") and key.endswith("weight") and value.dim() == 2:
            row_parallel = key.endswith(("linear_proj.weight", "linear_fc2.weight"))
            assert float(value.std()) == pytest.approx(0.01 if row_parallel else 0.02, rel=0.1), key


def _te_init(rank, world_size, out):
    from megasail.config import load_config
    from megasail.convert.hf_internvl import to_te_layout
    from megasail.models.init import init_weights
    from megasail.runtime import initialize
    from megasail.training.model_builder import build_model_chunks

    weights = {}
    for impl in ("local", "te"):
        cfg = load_config(None, ["model.language.vocab_size=512", "model.precision=fp32",
                                 f"model.transformer_impl={impl}", "model.vision.num_layers=1",
                                 "model.vision.hidden_size=64", "model.vision.num_attention_heads=4",
                                 "model.vision.ffn_hidden_size=128", "model.language.num_layers=2",
                                 "model.language.hidden_size=64", "model.language.num_attention_heads=4",
                                 "model.language.num_query_groups=2", "model.language.ffn_hidden_size=96"])
        initialize(1, 1, seed=3)
        chunks = build_model_chunks(cfg.model, cfg.parallel)
        init_weights(chunks, seed=5)
        state = {k: v.detach().float().cpu() for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")}
        weights[impl] = to_te_layout(state) if impl == "local" else state
    torch.save(weights, out)


def _have_te() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _have_te(), reason="needs Transformer Engine")
def test_transformer_engine_weights_initialise_as_the_local_spec(tmp_path):
    """On a GPU with Transformer Engine: a fresh TE model's initial weights equal the local spec's, name for name
    (local names mapped to TE's). Fails if TE's linears are not initialised (or differently)."""
    out = tmp_path / "te.pt"
    run_distributed_test(_te_init, 1, str(out))
    weights = torch.load(out, weights_only=True)
    assert set(weights["te"]) == set(weights["local"])
    for key, value in weights["local"].items():
        torch.testing.assert_close(weights["te"][key], value, rtol=0, atol=0, msg=key)
