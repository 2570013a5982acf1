"""megatron-core ``TransformerConfig`` objects for the three parts of the model.

Each part gets its own config: the ViT runs tensor parallel but never sequence or pipeline
parallel (1025 tokens per tile do not divide by TP, and it lives on pipeline stage 0 only);
the projector is a two-layer MLP; the language model takes the full ``ParallelConfig``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megasail.models.config import ModelConfig
from megasail.models.specs import use_transformer_engine

if TYPE_CHECKING:
    from megasail.config import ParallelConfig

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # model.precision


def _fused_softmax_kernels() -> bool:
    """megatron's fused masked softmax needs the compiled scaled_*softmax_cuda modules (apex)."""
    import importlib.util

    return importlib.util.find_spec("scaled_masked_softmax_cuda") is not None


def _common(model: ModelConfig, parallel: ParallelConfig | None) -> dict:
    """Settings shared by all parts: precision, TP size, fusions that need CUDA or TE."""
    use_te = use_transformer_engine(model.transformer_impl)
    on_gpu = torch.cuda.is_available()
    dtype = PRECISION_DTYPES[model.precision]
    common = dict(
        tensor_model_parallel_size=parallel.tensor if parallel else 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=model.precision == "bf16",
        fp16=model.precision == "fp16",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        masked_softmax_fusion=on_gpu and _fused_softmax_kernels(),  # CUDA kernel (apex/TE build)
        bias_activation_fusion=False,
        gradient_accumulation_fusion=False,  # needs apex's or TE's fused wgrad kernel
        persist_layer_norm=False,
        apply_rope_fusion=use_te and on_gpu,
        use_cpu_initialization=not on_gpu,
    )
    return common


def language_transformer_config(model: ModelConfig, parallel: ParallelConfig | None = None) -> TransformerConfig:
    """Qwen2 decoder: RMSNorm, SwiGLU, GQA with qkv bias, no other biases, no dropout."""
    lm = model.language
    kwargs = _common(model, parallel)
    if parallel is not None:
        kwargs.update(
            pipeline_model_parallel_size=parallel.pipeline,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline,
            context_parallel_size=parallel.context,
            sequence_parallel=parallel.sequence_parallel,
        )
        if parallel.pipeline > 1 and parallel.first_stage_llm_layers is not None:
            kwargs["num_layers_in_first_pipeline_stage"] = parallel.first_stage_llm_layers
    if model.fp8 is not None:  # LLM only: ViT/projector GEMMs (1025 tokens per tile) stay in bf16
        kwargs.update(fp8=model.fp8, fp8_recipe=model.fp8_recipe, fp8_amax_history_len=1024,
                      fp8_amax_compute_algo="max")
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        kv_channels=lm.kv_channels,
        ffn_hidden_size=lm.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=lm.layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=lm.qkv_bias,
        init_method_std=lm.init_method_std,
        bias_dropout_fusion=torch.cuda.is_available(),
        calculate_per_token_loss=True,  # grads normalised by the step's loss tokens over all micro-batches and DP
        **kwargs,
    )


def vision_transformer_config(model: ModelConfig, parallel: ParallelConfig | None = None) -> TransformerConfig:
    """InternViT: LayerNorm, GELU MLP with biases, qkv bias; TP only (see module docstring)."""
    vit = model.vision
    kwargs = _common(model, parallel)
    kwargs.pop("pipeline_dtype")
    return TransformerConfig(
        num_layers=max(vit.num_layers_used, 1),
        hidden_size=vit.hidden_size,
        num_attention_heads=vit.num_attention_heads,
        kv_channels=vit.hidden_size // vit.num_attention_heads,
        ffn_hidden_size=vit.ffn_hidden_size,
        normalization="LayerNorm",
        layernorm_epsilon=vit.layernorm_epsilon,
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=True,
        add_qkv_bias=vit.qkv_bias,
        init_method_std=vit.init_method_std,
        bias_dropout_fusion=False,  # layer scale is bound into bias-dropout-add
        sequence_parallel=False,
        pipeline_model_parallel_size=1,
        **kwargs,
    )


def projector_transformer_config(model: ModelConfig, parallel: ParallelConfig | None = None) -> TransformerConfig:
    """Projector MLP: in = ViT hidden / ratio^2, hidden = ffn = LLM hidden, GELU, biases."""
    kwargs = _common(model, parallel)
    kwargs.pop("pipeline_dtype")
    return TransformerConfig(
        num_layers=1,
        hidden_size=model.language.hidden_size,
        ffn_hidden_size=model.language.hidden_size,
        num_attention_heads=model.vision.num_attention_heads,  # unused; must divide by TP
        normalization="LayerNorm",
        layernorm_epsilon=model.projector.layernorm_epsilon,
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=True,
        init_method_std=model.language.init_method_std,
        bias_dropout_fusion=False,
        sequence_parallel=False,
        pipeline_model_parallel_size=1,
        **kwargs,
    )
