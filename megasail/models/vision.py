"""InternViT on megatron-core's ``TransformerBlock``.

Patch embedding (conv), cls token and learned position embedding are plain replicated
parameters (megatron-core has no ViT embedding without TE/apex: ``CLIPViTModel`` breaks
without them); the layers are megatron ``InternViTLayer``s, tensor parallel over heads and MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megasail.models.config import VisionConfig


class InternViT(MegatronModule):
    """Image tiles -> patch features of the ``select_layer`` hidden state, cls token dropped.

    Only the layers up to ``select_layer`` are built: later ones would never receive gradients.
    """

    def __init__(self, config: TransformerConfig, vision: VisionConfig, block_spec: TransformerBlockSubmodules):
        super().__init__(config=config)
        self.vision = vision
        hidden, dtype = vision.hidden_size, config.params_dtype
        self.patch_embedding = torch.nn.Conv2d(
            vision.num_channels, hidden, kernel_size=vision.patch_size, stride=vision.patch_size, dtype=dtype
        )
        self.class_token = torch.nn.Parameter(torch.zeros(1, 1, hidden, dtype=dtype)) if vision.class_token else None
        self.position_embedding = torch.nn.Parameter(torch.zeros(1, vision.seq_length, hidden, dtype=dtype))
        self.num_layers = vision.num_layers_used
        self.decoder = (
            TransformerBlock(config, block_spec, post_layer_norm=False, pre_process=True, post_process=False)
            if self.num_layers > 0 else None
        )

    def _position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[1, prefix + grid_h * grid_w, h]; the patch grid is bicubic-resized when the tile size
        differs from the checkpoint's (as transformers and InternVL do)."""
        grid = self.vision.grid_size
        if (grid_h, grid_w) == (grid, grid):
            return self.position_embedding
        prefix = int(self.vision.class_token)
        cls_pos, patch_pos = self.position_embedding[:, :prefix], self.position_embedding[:, prefix:]
        patch_pos = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patch_pos = patch_pos.to(self.position_embedding.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, pixels_nchw: torch.Tensor) -> torch.Tensor:
        """pixels_nchw: [tiles, 3, H, W] -> patch features [tiles, (H/p)*(W/p), vision hidden]."""
        patches_nhgw = self.patch_embedding(pixels_nchw.to(self.patch_embedding.weight.dtype))
        grid_h, grid_w = patches_nhgw.shape[-2:]
        hidden_nsh = patches_nhgw.flatten(2).transpose(1, 2)
        if self.class_token is not None:
            hidden_nsh = torch.cat([self.class_token.expand(hidden_nsh.shape[0], -1, -1), hidden_nsh], dim=1)
        hidden_nsh = hidden_nsh + self._position_embedding(grid_h, grid_w)
        if self.decoder is not None:
            hidden_snh = self.decoder(hidden_nsh.transpose(0, 1).contiguous(), attention_mask=None)
            hidden_nsh = hidden_snh.transpose(0, 1)
        return hidden_nsh[:, int(self.vision.class_token):]

    def set_input_tensor(self, input_tensor) -> None:
        """The ViT runs on the first pipeline stage only; it never receives a pipeline input."""
