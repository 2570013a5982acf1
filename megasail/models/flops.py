"""Matmul FLOPs of the model (2 per multiply-add), for MFU and for the ViT-aware pipeline split.

Forward FLOPs only; a training step costs about 3x (backward computes input and weight grads).
Attention is counted in full (s x s), as megatron-core's own FLOP formulas do for causal models.
"""

from __future__ import annotations

from megasail.models.config import ModelConfig


def vision_flops_per_tile(config: ModelConfig) -> int:
    """ViT (patch embedding + the layers that run) and projector for one tile."""
    vit = config.vision
    s, h, f = vit.seq_length, vit.hidden_size, vit.ffn_hidden_size
    patch = 2 * vit.num_patches * vit.num_channels * vit.patch_size**2 * h
    layer = 2 * s * (4 * h * h + 2 * h * f) + 4 * s * s * h  # qkv + proj, fc1 + fc2, scores + context
    tokens, width, lm_h = config.tokens_per_tile, config.projector_input_size, config.language.hidden_size
    projector = 2 * tokens * (width * lm_h + lm_h * lm_h)
    return patch + vit.num_layers_used * layer + projector


def language_layer_flops(config: ModelConfig, seq_length: int) -> int:
    """One decoder layer over one sequence of ``seq_length`` tokens."""
    lm = config.language
    h, d = lm.hidden_size, lm.kv_channels
    qkv = 2 * h * (lm.num_attention_heads + 2 * lm.num_query_groups) * d
    proj = 2 * lm.num_attention_heads * d * h
    mlp = 2 * 3 * h * lm.ffn_hidden_size  # gate, up, down
    attention = 4 * seq_length * lm.num_attention_heads * d
    return seq_length * (qkv + proj + mlp + attention)


def language_head_flops(config: ModelConfig, seq_length: int) -> int:
    """Output layer (logits) over one sequence."""
    return 2 * seq_length * config.language.hidden_size * config.language.vocab_size


def sequence_flops(config: ModelConfig, seq_length: int, tiles: int) -> int:
    """Forward FLOPs of one sequence with ``tiles`` image tiles."""
    return (tiles * vision_flops_per_tile(config) + config.language.num_layers * language_layer_flops(config, seq_length)
            + language_head_flops(config, seq_length))


def suggest_first_stage_layers(config: ModelConfig, pipeline: int, seq_length: int, tiles_per_sequence: float,
                               virtual_pipeline: int | None = None) -> int | None:
    """LLM layers for pipeline stage 0 that best balance it (ViT + projector + its layers) against
    the other stages, among the splits megatron accepts: stage 0 keeps at least one layer, the
    rest divide evenly over the other stages, and with virtual pipeline every stage's count
    divides by the number of chunks. None when PP is 1 or no split qualifies."""
    if pipeline == 1:
        return None
    vpp = virtual_pipeline or 1
    layers = config.language.num_layers
    layer = language_layer_flops(config, seq_length)
    vision = tiles_per_sequence * vision_flops_per_tile(config)
    head = language_head_flops(config, seq_length)
    best, best_cost = None, float("inf")
    for first in range(1, layers):  # megatron refuses an empty first stage
        rest = layers - first
        if rest % (pipeline - 1):
            continue
        per_stage = rest // (pipeline - 1)
        if first % vpp or per_stage % vpp:
            continue
        cost = max(vision + first * layer, per_stage * layer + head)
        if cost < best_cost:
            best, best_cost = first, cost
    return best
