"""Layer specs: Transformer Engine or megatron-core local modules, chosen here and nowhere else.

Both variants are the same model numerically; TE fuses each pre-norm into the following linear
(``linear_qkv.layer_norm_weight`` instead of ``input_layernorm.weight``) and is needed for FP8,
THD packed sequences and context parallel. The local variant uses ``LocalNorm`` so it runs
sequence parallel without apex.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megasail.models.layers import InternViTLayer, LocalNorm


def _transformer_engine_importable() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        from megatron.core.extensions.transformer_engine import TENorm  # noqa: F401  (imports TE itself)
    except Exception:  # a TE wheel built for another torch/CUDA fails here, not at find_spec
        return False
    return True


HAVE_TE = _transformer_engine_importable()


def use_transformer_engine(transformer_impl: str) -> bool:
    """Resolve ``model.transformer_impl`` (auto/local/te) against what is installed."""
    if transformer_impl == "local":
        return False
    if transformer_impl == "te":
        if not HAVE_TE:
            raise RuntimeError("model.transformer_impl=te but transformer_engine does not import on this machine")
        return True
    return HAVE_TE


def _backend(use_te: bool) -> BackendSpecProvider:
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


@dataclass
class _Pieces:
    """What differs between TE and local: the norm class and the (optionally norm-fused) linears."""

    norm: type
    pre_norm: type  # input_layernorm / pre_mlp_layernorm: IdentityOp when fused into the linear
    qkv: type
    fc1: type
    row: type
    core_attention: type
    # checkpoint keys of the unfused norms renamed to TE's fused ones (empty for TE itself)
    sharded_keys_map: dict[str, str]


def _te_checkpoint_keys_map() -> dict[str, str]:
    """megatron-core's own local-spec map (input_layernorm. -> self_attention.linear_qkv.layer_norm_,
    pre_mlp_layernorm. -> mlp.linear_fc1.layer_norm_): checkpoints carry TE's names whichever spec ran."""
    return dict(get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map)


def _pieces(use_te: bool) -> _Pieces:
    backend = _backend(use_te)
    if use_te:
        fused = backend.column_parallel_layer_norm_linear()
        return _Pieces(backend.layer_norm(), IdentityOp, fused, fused, backend.row_parallel_linear(),
                       backend.core_attention(), {})
    return _Pieces(LocalNorm, LocalNorm, backend.column_parallel_linear(), backend.column_parallel_linear(),
                   backend.row_parallel_linear(), backend.core_attention(), _te_checkpoint_keys_map())


def _layer_spec(module: type, pieces: _Pieces, mask_type: AttnMaskType, bda, params: dict | None = None) -> ModuleSpec:
    return ModuleSpec(
        module=module,
        params=params or {},
        submodules=TransformerLayerSubmodules(
            input_layernorm=pieces.pre_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=pieces.qkv,
                    core_attention=pieces.core_attention,
                    linear_proj=pieces.row,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=bda,
            pre_mlp_layernorm=pieces.pre_norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=pieces.fc1, linear_fc2=pieces.row)),
            mlp_bda=bda,
            sharded_state_dict_keys_map=pieces.sharded_keys_map,
        ),
    )


def vision_layer_spec(use_te: bool, layer_scale_init: float) -> ModuleSpec:
    """InternViT layer: bidirectional attention, LayerNorm, GELU MLP, layer scale in bias-dropout-add."""
    return _layer_spec(InternViTLayer, _pieces(use_te), AttnMaskType.no_mask, bda=get_bias_dropout_add,  # rebound with ls1/ls2
                       params={"layer_scale_init": layer_scale_init})


def language_layer_spec(use_te: bool, packed_sequences: bool) -> ModuleSpec:
    """Qwen2 decoder layer (RMSNorm comes from ``config.normalization``).

    Packed samples on the local spec take an explicit block-diagonal mask (``arbitrary``: the
    fused causal softmax kernel would ignore it); TE keeps ``causal`` and reads packed_seq_params.
    """
    mask_type = AttnMaskType.arbitrary if packed_sequences and not use_te else AttnMaskType.causal
    return _layer_spec(TransformerLayer, _pieces(use_te), mask_type, bda=get_bias_dropout_add)


def language_block_spec(
    config: TransformerConfig, use_te: bool, packed_sequences: bool, vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """This pipeline stage's decoder layers plus the final norm (local: ``LocalNorm``, so SP works)."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[language_layer_spec(use_te, packed_sequences)] * num_layers,
        layer_norm=_pieces(use_te).norm,
    )


def vision_block_spec(use_te: bool, layer_scale_init: float, num_layers: int) -> TransformerBlockSubmodules:
    """The ViT layers that run (no final norm: InternViT has none before the projector)."""
    return TransformerBlockSubmodules(layer_specs=[vision_layer_spec(use_te, layer_scale_init)] * num_layers,
                                      layer_norm=None)


def projector_specs(use_te: bool) -> tuple[type, MLPSubmodules]:
    """(input norm class, MLP submodules) of the projector; the norm is kept separate in both
    variants so the projector's keys are the same with and without TE."""
    pieces = _pieces(False)
    backend = _backend(use_te)
    return pieces.norm, MLPSubmodules(linear_fc1=backend.column_parallel_linear(),
                                      linear_fc2=backend.row_parallel_linear())
