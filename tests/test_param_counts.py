"""Parameter counts of the megasail model (built on the meta device) equal transformers' InternVL."""

from __future__ import annotations

import pytest
import torch
from model_utils import tiny_hf_config, tiny_model_config

from megasail.models.presets import sail_vl_2b, sail_vl_8b


@pytest.fixture(scope="module", autouse=True)
def single_process_megatron():
    from megasail import runtime

    runtime.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    yield
    runtime.destroy()


def _hf_config(config):
    """transformers InternVLConfig with the dims of a megasail ModelConfig."""
    from transformers import InternVLConfig

    vit, lm = config.vision, config.language
    return InternVLConfig(
        vision_config=dict(hidden_size=vit.hidden_size, num_hidden_layers=vit.num_layers,
                           num_attention_heads=vit.num_attention_heads, intermediate_size=vit.ffn_hidden_size,
                           image_size=vit.image_size, patch_size=vit.patch_size, attention_bias=vit.qkv_bias,
                           use_mean_pooling=True),
        text_config=dict(model_type="qwen2", hidden_size=lm.hidden_size, num_hidden_layers=lm.num_layers,
                         num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.num_query_groups,
                         intermediate_size=lm.ffn_hidden_size, vocab_size=lm.vocab_size,
                         tie_word_embeddings=not lm.untie_embeddings_and_output_weights),
        downsample_ratio=config.projector.downsample_ratio, vision_feature_layer=vit.select_layer,
        tie_word_embeddings=not lm.untie_embeddings_and_output_weights,
    )


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _hf_counts(hf_config, vision_layers_used: int) -> dict:
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        hf = InternVLForConditionalGeneration(hf_config)
    unused = sum(_count(layer) for layer in hf.model.vision_tower.encoder.layer[vision_layers_used:])
    counts = {
        "vision": _count(hf.model.vision_tower) - unused,
        "projector": _count(hf.model.multi_modal_projector),
        "language": _count(hf.model.language_model) + _count(hf.lm_head),
    }
    counts["total"] = _count(hf) - unused
    return counts


def _megasail_counts(config) -> dict:
    from megasail.models.sail_vl import SailVLModel

    with torch.device("meta"):
        model = SailVLModel(config)
    assert {p.device.type for p in model.parameters()} == {"meta"}  # nothing allocated
    counts = {"vision": _count(model.vision_model), "projector": _count(model.projector),
              "language": _count(model.language_model)}
    counts["total"] = _count(model)
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("preset", [sail_vl_2b, sail_vl_8b], ids=["2b", "8b"])
def test_preset_counts_equal_transformers(preset):
    config = preset()
    expected = _hf_counts(_hf_config(config), config.vision.num_layers_used)
    assert _megasail_counts(config) == expected


def test_released_2b_size():
    # the released SAIL-VL-2B bf16 file (4.18 GB) holds about 2.09B parameters with an untied lm_head
    counts = _megasail_counts(sail_vl_2b())
    assert 2.08e9 < counts["total"] < 2.10e9


@pytest.mark.parametrize("select_layer", [-1, -4])
def test_tiny_counts_equal_transformers(select_layer):
    config = tiny_model_config(select_layer)
    assert _megasail_counts(config) == _hf_counts(tiny_hf_config(select_layer), config.vision.num_layers_used)


def test_flop_formulas_match_torch_flop_counter():
    from model_utils import multimodal_batch
    from torch.utils.flop_counter import FlopCounterMode

    from megasail.models import flops
    from megasail.models.sail_vl import SailVLModel

    config = tiny_model_config(-4)
    model = SailVLModel(config).eval()
    with FlopCounterMode(display=False) as counter:  # (no torch.no_grad: its module hooks need grad_fns)
        model.image_embeddings(torch.randn(3, 3, 56, 56))
    assert counter.get_total_flops() == 3 * flops.vision_flops_per_tile(config)
    ids, positions, _ = multimodal_batch(config, tiles_per_image=(0, 0), seq_length=64)
    with FlopCounterMode(display=False) as counter:
        model(ids, positions, None)
    # the unfused local attention multiplies the whole 64 x 64 square (masked entries too); the
    # convention counts only the causal pairs, at the same price per pair
    f = flops.FlopsModel.from_config(config)
    per_row = 64 * (f.llm_linear_per_token + f.llm_head_per_token) + 64 * 64 * f.llm_attention_per_pair
    assert counter.get_total_flops() == 2 * per_row


def test_first_stage_split_accounts_for_the_vit():
    from megasail.models.flops import suggest_first_stage_layers

    config = sail_vl_2b()
    assert suggest_first_stage_layers(config, 1, 8192, 10) is None
    text_only = suggest_first_stage_layers(config, 2, 8192, 0)
    with_images = suggest_first_stage_layers(config, 2, 8192, 24)
    assert text_only > 14  # the output layer (about 3 layers' FLOPs at 152k vocab) weighs on the last stage
    assert with_images < 14
    assert suggest_first_stage_layers(config, 4, 8192, 24) in {1, 4, 7, 10, 13, 16, 19, 22, 25}
    for pp in (2, 4, 8):  # megatron refuses num_layers_in_first_pipeline_stage=0
        for tiles in (0, 4, 16, 64):
            first = suggest_first_stage_layers(config, pp, 8192, tiles)
            assert first is None or (first >= 1 and (28 - first) % (pp - 1) == 0), (pp, tiles, first)
    with_vpp = suggest_first_stage_layers(config, 4, 8192, 24, virtual_pipeline=2)
    assert with_vpp % 2 == 0 and ((28 - with_vpp) // 3) % 2 == 0
