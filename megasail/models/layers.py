"""The two layer pieces megatron-core lacks: a sequence-parallel-aware torch norm and the
InternViT transformer layer with layer scale."""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer


class LocalNorm:
    """``torch.nn.LayerNorm`` / ``RMSNorm`` (by ``config.normalization``) usable under sequence parallel.

    megatron-core's ``WrappedTorchNorm`` refuses sequence parallel; this one marks its parameters
    ``sequence_parallel`` so ``finalize_model_grads`` sums their gradients over the TP group (each
    rank saw only its slice of the sequence). State-dict keys are torch's (``weight``, ``bias``).
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        kwargs = dict(eps=eps, dtype=config.params_dtype)
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, **kwargs)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, **kwargs)
        else:
            raise ValueError(f"LocalNorm supports LayerNorm and RMSNorm, not {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _layer_scale_bias_dropout_add(scale, training: bool):
    """Like megatron's unfused bias-dropout-add, with the branch scaled: residual + scale * dropout(x + bias)."""

    def bias_dropout_add(x_with_bias, residual, prob):
        x, bias = x_with_bias
        if bias is not None:
            x = x + bias
        x = torch.nn.functional.dropout(x, p=prob, training=training)
        return residual.to(x.dtype) + scale * x

    return bias_dropout_add


class InternViTLayer(TransformerLayer):
    """megatron ``TransformerLayer`` with InternViT's per-channel layer scale (ls1, ls2).

    The scales are bound into the two bias-dropout-add callables (the layer is otherwise
    unchanged), so the config must have ``bias_dropout_fusion=False``.
    """

    def __init__(self, config: TransformerConfig, submodules, layer_scale_init: float = 1.0, **kwargs):
        if config.bias_dropout_fusion:
            raise ValueError("InternViTLayer needs bias_dropout_fusion=False (layer scale lives in bias-dropout-add)")
        super().__init__(config, submodules, **kwargs)
        shape = (config.hidden_size,)
        self.ls1 = torch.nn.Parameter(torch.full(shape, float(layer_scale_init), dtype=config.params_dtype))
        self.ls2 = torch.nn.Parameter(torch.full(shape, float(layer_scale_init), dtype=config.params_dtype))
        for param in (self.ls1, self.ls2):
            param.sequence_parallel = config.sequence_parallel  # replicated, but sees a sequence shard under SP
        self.self_attn_bda = self._attention_bda
        self.mlp_bda = self._mlp_bda

    def _attention_bda(self, training: bool, fused: bool):
        return _layer_scale_bias_dropout_add(self.ls1, training)

    def _mlp_bda(self, training: bool, fused: bool):
        return _layer_scale_bias_dropout_add(self.ls2, training)
