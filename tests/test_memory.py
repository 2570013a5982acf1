"""megasail.models.memory against the model it describes: parameter counts against the built model,
activation terms against the tensors autograd actually saves, and the per-rank arithmetic (sharding,
frozen parts, the distributed optimizer, the 1F1B schedule) against numbers written out here."""

from __future__ import annotations

import dataclasses
import os
import weakref

import pytest
import torch
from model_utils import tiny_model_config

from megasail.config import load_config
from megasail.models import memory
from megasail.models.presets import sail_vl_2b

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def single_process_megatron():
    from megasail import runtime

    runtime.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    yield
    runtime.destroy()


def _model_cfg(**language):
    """The tiny CPU model (fp32, local layers) at 448px tiles, with LLM dims set here."""
    cfg = load_config(os.path.join(REPO, "examples/configs/tiny.yaml"), ["model.packed_sequences=true"]).model
    lm = dict(
        vocab_size=512,
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
    )
    cfg.language = dataclasses.replace(cfg.language, **{**lm, **language})
    cfg.vision = dataclasses.replace(cfg.vision, num_layers=1)
    cfg.image_token_id = 500
    return cfg


@pytest.mark.parametrize(
    "config",
    [
        lambda: tiny_model_config(-1),
        lambda: tiny_model_config(-4),
        lambda: _model_cfg(qkv_bias=False, untie_embeddings_and_output_weights=False),
    ],
    ids=["tiny", "select_layer_-4", "no_qkv_bias_tied"],
)
def test_parameter_counts_equal_the_built_model(config):
    """The analytic counts per piece add up to the meta-device model's parameters per component.

    Fault caught: the LLM's qkv bias left out, the cls token left out, every ViT layer counted instead
    of those up to select_layer, a tied output layer counted again."""
    from megasail.models.sail_vl import SailVLModel

    cfg = config()
    with torch.device("meta"):
        model = SailVLModel(cfg)
    counts = memory.parameter_counts(cfg)
    lm = cfg.language
    built = {
        "vision": sum(p.numel() for p in model.vision_model.parameters()),
        "projector": sum(p.numel() for p in model.projector.parameters()),
        "language": sum(p.numel() for p in model.language_model.parameters()),
    }
    assert counts["vision"].total == built["vision"]
    assert counts["projector"].total == built["projector"]
    language = (
        counts["embedding"].total
        + lm.num_layers * counts["llm_layer"].total
        + counts["final_norm"].total
        + counts["output_layer"].total
    )
    assert language == built["language"]


def _saved_bytes(model, ids, positions, pixels, mask, labels) -> int:
    """Bytes of the distinct storages autograd holds for backward once the forward has returned
    (a tensor saved by a graph node that was dropped during the forward does not count), parameters
    excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, positions, pixels, mask, labels)
    storages = {}
    for ref in saved:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    del loss
    return sum(storages.values())


def _saved(cfg, recompute: str, trainable: list[str], tiles: int, seq: int) -> int:
    from megasail.models.sail_vl import SailVLModel
    from megasail.training.stages import apply_recompute

    torch.manual_seed(0)
    model = SailVLModel(cfg)
    apply_recompute([model], recompute, 1)
    for part, module in (
        ("vision", model.vision_model),
        ("projector", model.projector),
        ("language", model.language_model),
    ):
        module.requires_grad_(part in trainable)
    ids = torch.randint(0, 100, (1, seq))
    ids[0, 5 : 5 + tiles * cfg.tokens_per_tile] = cfg.image_token_id
    positions = torch.arange(seq)[None]
    pixels = torch.randn(tiles, 3, cfg.vision.image_size, cfg.vision.image_size) if tiles else None
    mask = torch.ones(seq, seq, dtype=torch.bool).triu(1)[None, None]
    return _saved_bytes(model, ids, positions, pixels, mask, torch.randint(0, 100, (1, seq)))


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize(
    "trainable", [["vision", "projector", "language"], ["projector"]], ids=["all_train", "llm_frozen"]
)
def test_layer_activations_equal_what_autograd_saves(recompute, trainable):
    """One decoder layer more (and one ViT layer more) adds exactly what the formulas say, counted as
    the distinct storages autograd's saved-tensor hooks see (CPU, fp32, local layers, 4 heads over 2
    KV groups, one 640-token micro-batch, 2 tiles).

    Fault caught: SwiGLU counted as 4f/t when it trains (or 5f/t when frozen), selective recompute
    keeping the softmax, q/k/v counted before megatron repeats the KV heads, the frozen layer's
    linear inputs counted, full recompute keeping more than the block input, a ViT term dropped."""
    from megasail.models.flops import gradient_roles

    seq, tiles = 640, 2
    roles = gradient_roles(trainable)
    one, two = _model_cfg(num_layers=1), _model_cfg(num_layers=2)
    per_layer = _saved(two, recompute, trainable, tiles, seq) - _saved(one, recompute, trainable, tiles, seq)
    layout = memory.MemoryLayout(
        seq_length=seq,
        recompute=recompute,
        flash_attention=False,
        device="cpu",
        attention_mask=True,
        tiles_per_sequence=tiles,
    )
    # a recomputed block also keeps the RNG states megatron's checkpoint restores (5 KiB)
    assert per_layer == pytest.approx(memory.llm_layer_activations(one, layout, roles["language"]), abs=2**14)
    if "vision" in trainable:
        vit_two = _model_cfg(num_layers=1)
        vit_two.vision = dataclasses.replace(vit_two.vision, num_layers=2)
        per_vit_layer = _saved(vit_two, recompute, trainable, tiles, seq) - _saved(
            one, recompute, trainable, tiles, seq
        )
        assert per_vit_layer / tiles == pytest.approx(memory.vit_tile_activations(one, layout), abs=2**14)


def _layout(**kwargs):
    return memory.MemoryLayout(
        **{
            "seq_length": 8192,
            "micro_batches": 8,
            "tiles_per_sequence": 10.0,
            "recompute": "selective",
            **kwargs,
        }
    )


def test_state_bytes_follow_precision_trainable_parts_and_sharding():
    """SAIL-VL-2B, TP=1: weights 2 bytes per parameter of the stage; fp32 grads and Adam (main copy +
    two moments, over DP) only for what trains; PP=2 puts the ViT, projector and embedding on stage 0 and
    the output layer on the last.

    Fault caught: frozen parameters given grads or optimizer state, optimizer state not divided by DP
    (or divided without the distributed optimizer), the ViT placed on the last stage, bf16 counted as 4."""
    cfg = sail_vl_2b()
    vit, proj, total = 304_012_288, 8_662_016, 2_089_762_304  # transformers' InternVL counts
    (one,) = memory.stage_memory(cfg, _layout(data_parallel=8), ["projector"])
    assert one.weights == total * 2
    assert one.grads == proj * 4
    assert one.optimizer == proj * 12 / 8
    (replicated,) = memory.stage_memory(
        cfg, _layout(data_parallel=8, distributed_optimizer=False), ["vision", "projector"]
    )
    assert replicated.optimizer == (vit + proj) * 12 and replicated.grads == (vit + proj) * 4
    first, last = memory.stage_memory(cfg, _layout(pipeline=2, first_stage_llm_layers=12), ["vision"])
    assert first.trainable_params == vit and last.trainable_params == 0
    layer = 1536 * (1536 + 2 * 256) + (1536 + 2 * 256) + 1536 * 1536 + 3 * 1536 * 8960 + 2 * 1536
    embedding = 151936 * 1536
    assert first.params == vit + proj + embedding + 12 * layer
    assert last.params == 16 * layer + 1536 + embedding  # final norm, untied output layer
    assert first.logits == 0 and last.logits == 8192 * 151936 * 4


def test_tensor_parallel_halves_sharded_weights_and_activations():
    """TP=2: linear weights and the per-head activations halve, norms and norm inputs stay whole
    (no sequence parallel), the logits halve over the vocabulary; sequence parallel halves the rest.

    Fault caught: replicated parameters divided by TP, the vocabulary-parallel logits left whole,
    sequence parallel ignored."""
    cfg = sail_vl_2b()
    counts = memory.parameter_counts(cfg)
    (tp1,) = memory.stage_memory(cfg, _layout(), ["language"])
    (tp2,) = memory.stage_memory(cfg, _layout(tensor=2), ["language"])
    (sp2,) = memory.stage_memory(cfg, _layout(tensor=2, sequence_parallel=True), ["language"])
    replicated = sum(c.replicated * (28 if k == "llm_layer" else 1) for k, c in counts.items())
    assert tp2.params == pytest.approx((tp1.params - replicated) / 2 + replicated)
    assert tp2.logits == tp1.logits / 2
    tokens, h, f = 8192, 1536, 8960
    # selective, flash, trains: norms 2 x 2h (input, output), q + k + qkv (h + gd + h + 2gd), proj input h,
    # SwiGLU 5f, in bf16; and two fp32 rstd
    sharded = (2 * h + 3 * 256 + h + 5 * f) / 2
    assert memory.llm_layer_activations(cfg, _layout(tensor=2), "trains") == tokens * (
        (4 * h + sharded) * 2 + 8
    )
    assert memory.llm_layer_activations(
        cfg, _layout(tensor=2, sequence_parallel=True), "trains"
    ) == tokens * ((4 * h / 2 + sharded) * 2 + 8 / 2)
    assert sp2.activations < tp2.activations < tp1.activations


@pytest.mark.parametrize(
    "pp,micro_batches,expected", [(4, 8, [4, 3, 2, 1]), (4, 2, [2, 2, 2, 1]), (2, 8, [2, 1])]
)
def test_one_f_one_b_keeps_pp_minus_rank_micro_batches(pp, micro_batches, expected):
    """Rank r of a 1F1B pipeline holds min(pp - r, micro-batches) micro-batches' activations; the ViT
    lives on stage 0 only, so stage 0 holds pp micro-batches of ViT activations.

    Fault caught: every rank charged pp micro-batches, or one, or the ViT charged on every stage."""
    cfg = sail_vl_2b()
    layout = _layout(pipeline=pp, micro_batches=micro_batches)
    ranks = memory.stage_memory(cfg, layout, ["vision", "projector", "language"])
    assert [r.in_flight for r in ranks] == expected
    vit = 10 * memory.vit_tile_activations(cfg, layout)
    layer = memory.llm_layer_activations(cfg, layout, "trains")
    hidden = 8192 * 1536 * 2  # each in-flight output of a non-last stage
    for r in ranks[1:-1]:
        assert r.activations == pytest.approx(r.in_flight * (r.llm_layers * layer + hidden))
    head = ranks[-1].activations - ranks[-1].llm_layers * layer
    first = ranks[0]
    assert first.activations == pytest.approx(
        first.in_flight * (first.llm_layers * layer + vit + hidden)
        + first.in_flight * ranks[0].parts["projector"]
    )
    assert 0 < head < layer  # one micro-batch's final norm and output-layer input on the last stage


def test_unfused_attention_keeps_the_softmax_unless_recomputed():
    """The local spec's core attention keeps a [b, a/t, s, s] softmax per layer (fp32, plus its bf16
    copy at bf16): 6 bytes x 12 heads x 8192^2 for SAIL-VL-2B; selective recompute and flash attention
    keep none of it.

    Fault caught: the s^2 term kept under selective or flash, or counted at 2 bytes."""
    cfg = sail_vl_2b()
    unfused = memory.llm_layer_activations(cfg, _layout(recompute="none", flash_attention=False), "trains")
    selective = memory.llm_layer_activations(
        cfg, _layout(recompute="selective", flash_attention=False), "trains"
    )
    flash = memory.llm_layer_activations(cfg, _layout(recompute="none"), "trains")
    tokens, h = 8192, 1536
    # the softmax, and k and v repeated to every head (3h) instead of q, k and the fused qkv (2h + 3gd)
    assert unfused - selective == 12 * 8192 * 8192 * 6 + tokens * (3 * h - (2 * h + 3 * 256)) * 2
    assert flash < selective < unfused


def test_gpu_table_and_largest_stage():
    """Every GPU the FLOPs table knows has a memory size (a new --gpu choice without one would plan with
    no budget); the largest stage is the biggest total (stage 0 with the ViT at PP=4)."""
    from megasail.models.flops import GPU_PEAKS

    assert set(memory.GPU_MEMORY_GIB) == set(GPU_PEAKS)
    assert memory.GPU_MEMORY_GIB["H100-SXM"] == 80 and memory.GPU_MEMORY_GIB["H200"] == 141
    ranks = memory.stage_memory(sail_vl_2b(), _layout(pipeline=4, micro_batches=8), ["vision", "projector"])
    assert memory.largest_stage(ranks) is max(ranks, key=lambda r: r.total)
    assert memory.largest_stage(ranks).pp_rank == 0
