"""Model presets as data: the released SAIL-VL sizes and a tiny CPU model.

``examples/configs/{sail_vl_2b,sail_vl_8b,tiny}.yaml`` mirror these (a test holds them equal).
"""

from __future__ import annotations

from megasail.models.config import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig


def internvit_300m() -> VisionConfig:
    """InternViT-300M-448px: 24 layers, 1024 hidden, 16 heads, 4096 GELU MLP, patch 14."""
    return VisionConfig(num_layers=24, hidden_size=1024, num_attention_heads=16, ffn_hidden_size=4096,
                        image_size=448, patch_size=14, layernorm_epsilon=1e-6, qkv_bias=True, select_layer=-1)


def sail_vl_2b() -> ModelConfig:
    """SAIL-VL-2B: InternViT-300M + Qwen2.5-1.5B (untied lm_head)."""
    return ModelConfig(
        vision=internvit_300m(),
        projector=ProjectorConfig(downsample_ratio=0.5, ps_version="v2"),
        language=LanguageConfig(num_layers=28, hidden_size=1536, num_attention_heads=12, num_query_groups=2,
                                ffn_hidden_size=8960, vocab_size=151936, rotary_base=1000000,
                                layernorm_epsilon=1e-6, max_position_embeddings=32768,
                                untie_embeddings_and_output_weights=True),
        precision="bf16",
    )


def sail_vl_8b() -> ModelConfig:
    """SAIL-VL-8B: InternViT-300M + Qwen2.5-7B."""
    return ModelConfig(
        vision=internvit_300m(),
        projector=ProjectorConfig(downsample_ratio=0.5, ps_version="v2"),
        language=LanguageConfig(num_layers=28, hidden_size=3584, num_attention_heads=28, num_query_groups=4,
                                ffn_hidden_size=18944, vocab_size=152064, rotary_base=1000000,
                                layernorm_epsilon=1e-6, max_position_embeddings=32768,
                                untie_embeddings_and_output_weights=True),
        precision="bf16",
    )


def tiny() -> ModelConfig:
    """A few-million-parameter model with the real tile geometry (448px, 256 tokens per tile) and
    the Qwen2.5 vocabulary, for CPU quickstarts and end-to-end tests."""
    return ModelConfig(
        vision=VisionConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                            image_size=448, patch_size=14, select_layer=-1),
        projector=ProjectorConfig(downsample_ratio=0.5, ps_version="v2"),
        language=LanguageConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                                ffn_hidden_size=128, vocab_size=151936, rotary_base=1000000,
                                max_position_embeddings=4096),
        precision="fp32",
        transformer_impl="local",
    )


PRESETS = {"sail_vl_2b": sail_vl_2b, "sail_vl_8b": sail_vl_8b, "tiny": tiny}
