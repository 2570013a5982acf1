"""SAIL-VL: InternViT + pixel-shuffle projector + Qwen2 decoder (megatron ``GPTModel``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megasail.models import specs
from megasail.models.config import ModelConfig
from megasail.models.mcore_config import (
    language_transformer_config,
    projector_transformer_config,
    vision_transformer_config,
)
from megasail.models.projector import VisionProjector
from megasail.models.vision import InternViT

if TYPE_CHECKING:
    from megasail.config import ParallelConfig


class SailVLModel(MegatronModule):
    """The vision-language model for one pipeline stage (one virtual chunk with ``vp_stage``).

    The vision tower and projector exist only where ``pre_process`` (the first stage); the
    language model's layers are split over stages by megatron (``num_layers_in_first_pipeline_stage``
    from ``ParallelConfig.first_stage_llm_layers`` gives stage 0 fewer). ``self.config`` is the
    language model's ``TransformerConfig`` (what megatron's schedules and DDP read).
    """

    def __init__(
        self,
        config: ModelConfig,
        parallel: ParallelConfig | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ):
        config.validate()
        language_config = language_transformer_config(config, parallel)
        if language_config.context_parallel_size > 1:
            # images must be spliced before the CP split (cf. LLaVAModel._process_embedding_token_parallel)
            raise NotImplementedError("SailVLModel does not support context parallel (parallel.context > 1) yet")
        super().__init__(config=language_config)
        self.model_config = config
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.pre_process = pre_process
        self.post_process = post_process
        self.use_te = specs.use_transformer_engine(config.transformer_impl)
        self.packed_sequences = config.packed_sequences
        self.image_token_id = config.image_token_id
        self.tokens_per_tile = config.tokens_per_tile
        self.sequence_parallel = language_config.sequence_parallel

        self.vision_model = None
        self.projector = None
        if pre_process:
            vision_config = vision_transformer_config(config, parallel)
            self.vision_model = InternViT(
                vision_config,
                config.vision,
                specs.vision_block_spec(self.use_te, config.vision.initializer_factor, config.vision.num_layers_used),
            )
            norm, mlp_submodules = specs.projector_specs(self.use_te)
            self.projector = VisionProjector(
                projector_transformer_config(config, parallel),
                norm,
                mlp_submodules,
                input_size=config.projector_input_size,
                downsample_ratio=config.projector.downsample_ratio,
                ps_version=config.projector.ps_version,
            )
        lm = config.language
        self.language_model = GPTModel(
            config=language_config,
            transformer_layer_spec=specs.language_block_spec(
                language_config, self.use_te, config.packed_sequences, vp_stage=vp_stage
            ),
            vocab_size=lm.vocab_size,
            max_sequence_length=lm.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,  # vocab-parallel loss; parallel_output=False breaks backward with labels
            share_embeddings_and_output_weights=not lm.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=lm.rotary_base,
            scatter_embedding_sequence_parallel=False,  # images are spliced on the full sequence first
            vp_stage=vp_stage,
        )

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        """Read by megatron's finalize_model_grads (tied embedding grads are summed over PP ends)."""
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline-parallel input of this stage (hidden states from the previous stage)."""
        self.language_model.set_input_tensor(input_tensor)

    def image_embeddings(self, pixels_nchw: torch.Tensor) -> torch.Tensor:
        """pixels_nchw: [tiles, 3, H, W] -> [tiles, tokens_per_tile, LLM hidden]."""
        return self.projector(self.vision_model(pixels_nchw))

    def _vision_params_touch(self) -> torch.Tensor | None:
        """0 * (sum of trainable vision/projector params): a graph edge to every such parameter,
        so DDP's gradient hooks fire (with exact zeros) on micro-batches without images."""
        params = [p for m in (self.vision_model, self.projector) for p in m.parameters() if p.requires_grad]
        if not params:
            return None
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, pixel_values) -> torch.Tensor:
        """Token embeddings with image embeddings at <IMG_CONTEXT> positions: [s, b, h]
        (scattered to [s/tp, b, h] under sequence parallel)."""
        embeds_sbh = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
        image_mask_bs = input_ids == self.image_token_id
        if pixel_values is not None:
            images_nth = self.image_embeddings(pixel_values)
            n_context = int(image_mask_bs.sum())
            if n_context != images_nth.shape[0] * images_nth.shape[1]:
                raise ValueError(
                    f"the micro-batch has {n_context} <IMG_CONTEXT> tokens (id {self.image_token_id}) but "
                    f"{images_nth.shape[0]} tiles x {self.tokens_per_tile} = "
                    f"{images_nth.shape[0] * images_nth.shape[1]} image embeddings"
                )
            embeds_bsh = embeds_sbh.transpose(0, 1)
            # masked_scatter fills positions in row-major [b, s] order: the tiles' order of appearance
            embeds_bsh = embeds_bsh.masked_scatter(image_mask_bs.unsqueeze(-1), images_nth.to(embeds_bsh.dtype))
            embeds_sbh = embeds_bsh.transpose(0, 1).contiguous()
        else:
            if bool(image_mask_bs.any()):
                raise ValueError(f"{int(image_mask_bs.sum())} <IMG_CONTEXT> tokens but no pixel_values")
            touch = self._vision_params_touch()
            if touch is not None:
                embeds_sbh = embeds_sbh + touch.to(embeds_sbh.dtype)
        if self.sequence_parallel:
            embeds_sbh = tensor_parallel.scatter_to_sequence_parallel_region(embeds_sbh)
        return embeds_sbh

    def _attention_mask(self, attention_mask, input_ids) -> torch.Tensor | None:
        if attention_mask is not None and not (self.packed_sequences and not self.use_te):
            # causal layers (and TE) ignore a mask: packed samples would silently attend to each other
            raise ValueError(
                "an attention_mask was given but the layers are causal: set model.packed_sequences=true for "
                "packed batches on local layers; with Transformer Engine pass packed_seq_params (cu_seqlens)"
            )
        if attention_mask is not None or not (self.packed_sequences and not self.use_te):
            return attention_mask
        # the 'arbitrary' mask type applies only the mask it is given: None would mean bidirectional
        if input_ids is not None:
            seq_length, device = input_ids.shape[1], input_ids.device
        else:  # a later pipeline stage: the sequence length comes with the stage input [s(/tp), b, h]
            hidden = self.language_model.decoder.input_tensor
            seq_length = hidden.shape[0] * (self.config.tensor_model_parallel_size if self.sequence_parallel else 1)
            device = hidden.device
        return torch.ones(seq_length, seq_length, dtype=torch.bool, device=device).triu(1)[None, None]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Run this stage.

        input_ids, position_ids: [b, s]; pixel_values: [tiles, 3, H, W], every tile of the
        micro-batch in order of appearance (first stage only); attention_mask: None (causal) or
        bool broadcastable to [b, 1, s, s], True = masked out (packed samples: block-diagonal
        causal); labels: [b, s] already shifted (labels[t] is the token after t).
        Returns per-token loss [b, s] with labels, else logits [b, s, vocab / tp] on the last
        stage; hidden states [s, b, h] (or [s/tp, b, h] under sequence parallel) elsewhere.
        """
        decoder_input = None
        if self.pre_process:
            decoder_input = self._embed(input_ids, position_ids, pixel_values)
        attention_mask = self._attention_mask(attention_mask, input_ids)
        return self.language_model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
        )
