"""Pixel shuffle and the vision-to-language MLP (InternVL's ``mlp1``)."""

from __future__ import annotations

import torch
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def pixel_shuffle(feats_nhwc: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """Merge each (1/scale)^2 block of patches into one token, InternVL's way.

    feats_nhwc: [n, rows, cols, c] (row-major patch grid) -> [n, rows*scale, cols*scale, c/scale^2].
    ``v2`` gives token (i, j) = concat(x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1]);
    ``v1`` (InternVL 1.x) skips the final transpose, so its grid comes out transposed.
    """
    n, rows, cols, c = feats_nhwc.shape
    out_rows, out_cols = int(rows * scale), int(cols * scale)
    if out_rows / scale != rows or out_cols / scale != cols:
        raise ValueError(f"patch grid {rows}x{cols} does not divide by the pixel-shuffle scale {scale}")
    x = feats_nhwc.reshape(n, rows, out_cols, int(c / scale))
    x = x.permute(0, 2, 1, 3).reshape(n, out_cols, out_rows, int(c / (scale * scale)))
    if version == "v2":
        x = x.permute(0, 2, 1, 3)
    elif version != "v1":
        raise ValueError(f"unknown pixel-shuffle version {version!r} (v1 or v2)")
    return x.contiguous()


class VisionProjector(MegatronModule):
    """patch features [tiles, patches, c] -> LLM embeddings [tiles, patches * ratio^2, h].

    Pixel shuffle, then LayerNorm -> ColumnParallelLinear -> GELU -> RowParallelLinear
    (megatron's ``MultimodalProjector``); the output is whole on every TP rank.
    """

    def __init__(
        self,
        config: TransformerConfig,
        norm: type,
        submodules: MLPSubmodules,
        input_size: int,
        downsample_ratio: float,
        ps_version: str,
    ):
        super().__init__(config=config)
        self.downsample_ratio = downsample_ratio
        self.ps_version = ps_version
        self.layer_norm = norm(config, hidden_size=input_size, eps=config.layernorm_epsilon)
        tp_group = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"]).tp  # as TransformerLayer does
        self.mlp = MultimodalProjector(config, submodules, projector_type="mlp", input_size=input_size,
                                       tp_group=tp_group)

    def forward(self, feats_nph: torch.Tensor) -> torch.Tensor:
        """feats_nph: [tiles, patches, c] (patches row-major on a square grid) -> [tiles, tokens, h]."""
        n, patches, c = feats_nph.shape
        side = int(round(patches**0.5))
        if side * side != patches:
            raise ValueError(f"pixel shuffle needs a square patch grid, got {patches} patches per tile")
        tokens = pixel_shuffle(feats_nph.reshape(n, side, side, c), self.downsample_ratio, self.ps_version)
        tokens_nth = tokens.reshape(n, -1, tokens.shape[-1])
        return self.mlp(self.layer_norm(tokens_nth))
