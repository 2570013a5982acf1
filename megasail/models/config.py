"""Model configuration: InternViT vision tower, pixel-shuffle projector, Qwen2 language model.

Plain dataclasses (no megatron import) so that ``--help`` and config files load fast; the
megatron ``TransformerConfig`` objects are derived from these in ``megasail.models.mcore_config``.
Numbers that follow from others (patch count, projector width, tokens per tile) are properties.
"""

from __future__ import annotations

from dataclasses import dataclass

from megasail.fields import doc

PRECISIONS = ("bf16", "fp16", "fp32")
TRANSFORMER_IMPLS = ("auto", "local", "te")
FP8_FORMATS = (None, "hybrid", "e4m3")
PS_VERSIONS = ("v1", "v2")


@dataclass
class VisionConfig:
    """InternViT (pre-norm ViT with layer scale, cls token and learned position embedding)."""

    num_layers: int = doc("ViT layers in the checkpoint (layers after select_layer are not built)", 24)
    hidden_size: int = doc("ViT hidden size", 1024)
    num_attention_heads: int = doc("ViT attention heads (split over tensor-parallel ranks)", 16)
    ffn_hidden_size: int = doc("ViT GELU MLP inner size", 4096)
    image_size: int = doc("tile side in pixels the position embedding was trained for", 448)
    patch_size: int = doc("patch side in pixels (conv stride)", 14)
    num_channels: int = doc("input image channels", 3)
    layernorm_epsilon: float = doc("LayerNorm epsilon", 1e-6)
    qkv_bias: bool = doc("bias on the fused q/k/v projection", True)
    initializer_factor: float = doc("layer-scale vectors ls1/ls2 start at ones * this value", 1.0)
    select_layer: int = doc(
        "hidden state fed to the projector, indexed like transformers' hidden_states "
        "(0 = embeddings, -1 = last layer; SAIL-VL's config class defaults to -4)", -1
    )
    class_token: bool = doc("prepend a learned cls token (dropped before the projector)", True)
    init_method_std: float = doc("std of the normal init of linear weights", 0.02)

    @property
    def grid_size(self) -> int:
        """Patches per tile side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def seq_length(self) -> int:
        """Tokens per tile inside the ViT (patches plus the cls token)."""
        return self.num_patches + int(self.class_token)

    @property
    def num_layers_used(self) -> int:
        """Layers that run: ``hidden_states[select_layer]`` is the output of this many layers."""
        index = self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer
        return index

    def validate(self) -> None:
        if not 0 <= self.num_layers_used <= self.num_layers:
            raise ValueError(
                f"model.vision.select_layer={self.select_layer} is outside hidden_states of a "
                f"{self.num_layers}-layer ViT (valid: {-(self.num_layers + 1)}..{self.num_layers})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"model.vision.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("model.vision.hidden_size must be divisible by model.vision.num_attention_heads")


@dataclass
class ProjectorConfig:
    """Pixel shuffle then LayerNorm -> Linear -> GELU -> Linear (InternVL's ``mlp1``)."""

    downsample_ratio: float = doc("pixel-shuffle scale: 0.5 merges each 2x2 patch block into one token", 0.5)
    ps_version: str = doc("pixel-shuffle variant: v2 (row-major 2x2 blocks, InternVL >= 1.5) or v1 (transposed grid)", "v2")
    layernorm_epsilon: float = doc("epsilon of the projector's input LayerNorm (torch default, as in InternVL)", 1e-5)

    @property
    def merge_factor(self) -> int:
        """Patches merged into one token (4 for downsample_ratio 0.5)."""
        return round(1 / self.downsample_ratio) ** 2

    def validate(self) -> None:
        if self.ps_version not in PS_VERSIONS:
            raise ValueError(f"model.projector.ps_version must be one of {PS_VERSIONS}, got {self.ps_version!r}")
        side = 1 / self.downsample_ratio
        if abs(side - round(side)) > 1e-9 or round(side) < 1:
            raise ValueError(f"model.projector.downsample_ratio={self.downsample_ratio} must be 1/k for an integer k")


@dataclass
class LanguageConfig:
    """Qwen2 decoder: RMSNorm, SwiGLU, grouped-query attention with qkv bias, RoPE."""

    num_layers: int = doc("decoder layers", 28)
    hidden_size: int = doc("decoder hidden size", 1536)
    num_attention_heads: int = doc("query heads", 12)
    num_query_groups: int = doc("key/value heads (grouped-query attention)", 2)
    ffn_hidden_size: int = doc("SwiGLU inner size (per gate/up half)", 8960)
    vocab_size: int = doc("vocabulary size of the embedding and output layer", 151936)
    rotary_base: int = doc("RoPE theta", 1000000)
    layernorm_epsilon: float = doc("RMSNorm epsilon", 1e-6)
    max_position_embeddings: int = doc("longest sequence the RoPE table is built for", 32768)
    untie_embeddings_and_output_weights: bool = doc("separate output layer (lm_head) instead of the embedding", True)
    qkv_bias: bool = doc("bias on the fused q/k/v projection", True)
    init_method_std: float = doc("std of the normal init of linear weights", 0.02)

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("model.language.hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError("model.language.num_attention_heads must be divisible by num_query_groups")


@dataclass
class ModelConfig:
    """The SAIL-VL model: vision tower + projector + language model, and how its layers are built."""

    vision: VisionConfig = doc("InternViT vision tower", default_factory=VisionConfig)
    projector: ProjectorConfig = doc("pixel shuffle + MLP connector", default_factory=ProjectorConfig)
    language: LanguageConfig = doc("Qwen2 language model", default_factory=LanguageConfig)
    precision: str = doc("parameter/compute dtype: bf16, fp16 or fp32", "bf16")
    transformer_impl: str = doc("layer implementation: auto (Transformer Engine when importable), local or te", "auto")
    fp8: str | None = doc("FP8 format with Transformer Engine: null, hybrid or e4m3", None)
    fp8_recipe: str = doc("FP8 scaling recipe passed to megatron-core (delayed, tensorwise, mxfp8, blockwise)", "delayed")
    image_token_id: int = doc("token id of <IMG_CONTEXT>; image embeddings replace these positions in order", 151667)
    packed_sequences: bool = doc(
        "several samples share a sequence: attention takes a block-diagonal causal mask "
        "(local spec) or packed_seq_params (Transformer Engine)", False
    )

    @property
    def projector_input_size(self) -> int:
        """Width of one pixel-shuffled token: ViT hidden / downsample_ratio^2."""
        return self.vision.hidden_size * self.projector.merge_factor

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one image tile becomes (256 for 448px tiles, patch 14, ratio 0.5)."""
        return self.vision.num_patches // self.projector.merge_factor

    def validate(self) -> None:
        self.vision.validate()
        self.projector.validate()
        self.language.validate()
        if self.precision not in PRECISIONS:
            raise ValueError(f"model.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ValueError(f"model.transformer_impl must be one of {TRANSFORMER_IMPLS}, got {self.transformer_impl!r}")
        if self.fp8 not in FP8_FORMATS:
            raise ValueError(f"model.fp8 must be one of {FP8_FORMATS}, got {self.fp8!r}")
        if self.fp8 is not None and self.transformer_impl == "local":
            raise ValueError("model.fp8 needs Transformer Engine: set model.transformer_impl to auto or te")
        side = round(1 / self.projector.downsample_ratio)
        if self.vision.grid_size % side:
            raise ValueError(
                f"ViT grid {self.vision.grid_size}x{self.vision.grid_size} does not divide by the pixel-shuffle "
                f"block {side}x{side} (model.projector.downsample_ratio={self.projector.downsample_ratio})"
            )
