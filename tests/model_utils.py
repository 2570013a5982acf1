"""Shared model-test helpers: a tiny transformers InternVL oracle, matching megasail configs,
synthetic multimodal batches, and slicing of an unsharded state dict into TP/PP shards."""

from __future__ import annotations

import re

import torch

from megasail.convert.hf_internvl import model_config_from_hf
from megasail.models.config import ModelConfig
from megasail.models.init import tp_shard

TINY_IMAGE_TOKEN = 250  # inside the tiny vocabulary


def tiny_hf_config(select_layer: int = -1, vision_layers: int = 5, language_layers: int = 2, **vision):
    """transformers InternVLConfig with tiny dims: 56px tiles, patch 7 (8x8 grid -> 16 tokens per tile)."""
    from transformers import InternVLConfig

    vision_config = dict(
        hidden_size=32, num_hidden_layers=vision_layers, num_attention_heads=4, intermediate_size=64,
        image_size=56, patch_size=7, attention_bias=True, layer_norm_eps=1e-6, layer_scale_init_value=1.0,
        use_mean_pooling=True, **vision,
    )
    text_config = dict(
        model_type="qwen2", hidden_size=64, num_hidden_layers=language_layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, vocab_size=256, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
        tie_word_embeddings=False,
    )
    return InternVLConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=TINY_IMAGE_TOKEN,
        downsample_ratio=0.5, vision_feature_layer=select_layer, tie_word_embeddings=False,
    )


def tiny_hf_model(select_layer: int = -1, seed: int = 0, **kwargs):
    """Randomly initialised tiny InternVLForConditionalGeneration in fp32 eval mode. Every tensor is
    redrawn (transformers starts cls/position embeddings at zero and layer scale at a constant)."""
    from transformers import InternVLForConditionalGeneration

    config = tiny_hf_config(select_layer, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lambda_1", "lambda_2")) or "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.05 * torch.randn_like(param))
    return model


def tiny_model_config(select_layer: int = -1, **overrides) -> ModelConfig:
    """megasail config of the tiny HF model, fp32 and local layers (what the CPU tests run)."""
    overrides = {"precision": "fp32", "transformer_impl": "local", **overrides}
    return model_config_from_hf(tiny_hf_config(select_layer), **overrides)


def multimodal_batch(config: ModelConfig, tiles_per_image=(1, 3), seq_length: int = 96, batch: int = 2, seed: int = 0):
    """Random token ids with one image per sample (tile counts from ``tiles_per_image``) spliced
    at <IMG_CONTEXT> runs. Returns (input_ids [b, s], position_ids [b, s], pixel_values [tiles, 3, H, W])."""
    g = torch.Generator().manual_seed(seed)
    vocab = config.language.vocab_size
    ids = torch.randint(0, vocab - 10, (batch, seq_length), generator=g)
    for b, tiles in enumerate(tiles_per_image[:batch]):
        start = 3 + 2 * b
        ids[b, start : start + tiles * config.tokens_per_tile] = config.image_token_id
    n_tiles = sum(tiles_per_image[:batch])
    size = config.vision.image_size
    pixels = torch.randn(n_tiles, config.vision.num_channels, size, size, generator=g)
    positions = torch.arange(seq_length).expand(batch, -1).contiguous()
    return ids, positions, pixels


# --- sharding an unsharded (TP=1, PP=1) megasail state dict -------------------------------------

_LM_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.*)$")


def stage_layer_ranges(num_layers: int, pp_size: int, vp_size: int | None = None,
                       first_stage_layers: int | None = None) -> list[list[range]]:
    """Global decoder layers of each (pipeline rank, virtual chunk), as megatron assigns them."""
    vp = vp_size or 1
    if first_stage_layers is not None and pp_size > 1:
        if vp != 1:
            raise NotImplementedError("uneven first stage with virtual pipeline")
        rest = (num_layers - first_stage_layers) // (pp_size - 1)
        sizes = [first_stage_layers] + [rest] * (pp_size - 1)
        starts = [0] + [first_stage_layers + rest * i for i in range(pp_size - 1)]
        return [[range(s, s + n)] for s, n in zip(starts, sizes, strict=True)]
    per_chunk = num_layers // (pp_size * vp)
    return [[range(v * pp_size * per_chunk + p * per_chunk, v * pp_size * per_chunk + (p + 1) * per_chunk)
             for v in range(vp)] for p in range(pp_size)]


def _tp_slice(key: str, tensor: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    return tp_shard(key, tensor, tp_rank, tp_size)  # the layout rule training's initialisation uses


def shard_state_dict(full_sd: dict, model_config: ModelConfig, tp_rank: int = 0, tp_size: int = 1,
                     pp_rank: int = 0, pp_size: int = 1, vp_stage: int | None = None, vp_size: int | None = None,
                     first_stage_layers: int | None = None) -> dict:
    """The part of an unsharded megasail state dict that one (TP rank, PP rank[, virtual chunk])
    model holds, with decoder layers renumbered to the stage-local indices megatron uses."""
    num_layers = model_config.language.num_layers
    ranges = stage_layer_ranges(num_layers, pp_size, vp_size, first_stage_layers)
    chunk = ranges[pp_rank][vp_stage or 0]
    first = pp_rank == 0 and (vp_stage or 0) == 0
    last = pp_rank == pp_size - 1 and (vp_stage or 0) == (vp_size or 1) - 1
    out = {}
    for key, tensor in full_sd.items():
        m = _LM_LAYER.match(key)
        if m:
            layer = int(m[1])
            if layer not in chunk:
                continue
            key = f"language_model.decoder.layers.{layer - chunk.start}.{m[2]}"
        elif key.startswith(("vision_model.", "projector.", "language_model.embedding.")):
            if not first:
                continue
        elif key.startswith(("language_model.decoder.final_layernorm.", "language_model.output_layer.")):
            if not last:
                continue
        out[key] = _tp_slice(key, tensor, tp_rank, tp_size)
    return out
