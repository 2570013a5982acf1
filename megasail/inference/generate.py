"""Autoregressive generation for SailVLModel (one pipeline stage per rank, any TP/PP).

KV cache: megatron-core's ``StaticInferenceContext`` (megatron.core.inference.contexts). The
language model is a plain megatron ``GPTModel`` and its ``SelfAttention`` already reads and fills
that context (prefill writes the prompt's keys/values, each decode step appends one position and
slices the rotary table at the right offset), so no cache of our own is needed. The vision tower
and projector run once, in the prefill, on the first pipeline stage.

Batches are left-padded to the longest prompt: pad keys are masked out through an explicit
attention mask (the local core attention applies a given mask in place of its causal one; RoPE is
relative, so the constant shift of a padded row does not change its scores). Transformer Engine's
causal kernel ignores masks, so padded batches need the local spec (``transformer_impl=local``);
a batch of equal-length prompts runs on either. On the local spec every batch, padded or not, gets
the explicit mask: a batch of one then runs the same masking as a batch of eight (the same answers
at any batch size), and layers built for packed training (``arbitrary`` mask type) apply no causal
mask of their own, so without it a prompt would attend to its own future in the prefill.

Pipeline parallel: each stage receives the previous stage's hidden states, runs its layers and
sends its own on (megatron's ``send_to_next_pipeline_rank`` / ``recv_from_prev_pipeline_rank_``);
the last stage samples and broadcasts the new tokens over the pipeline group.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.communication_utils import (
    recv_from_prev_pipeline_rank_,
    send_to_next_pipeline_rank,
)
from megatron.core.inference.contexts import StaticInferenceContext


@dataclass
class SamplingParams:
    """How the next token is chosen: greedy (argmax) or temperature + nucleus (top-p) sampling."""

    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@dataclass
class Request:
    """One prompt: token ids with <IMG_CONTEXT> runs already expanded, and its tiles [n, 3, H, W]."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None = None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of the whole call (prefill included)."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens, the stop token included when one ended the answer
    stopped: bool  # ended on a stop token (else on max_new_tokens)
    stats: GenerationStats = field(default_factory=GenerationStats)
    # per generated token: top logit minus the runner-up (fp32; near 0 = a near-tie another layout may break)
    logit_gaps: list[float] = field(default_factory=list)


def top_logit_gap(logits_bv: torch.Tensor) -> torch.Tensor:
    """Top logit minus the second one per row of [b, vocab] -> [b] (float32, on the CPU)."""
    top2 = logits_bv.float().topk(2, dim=-1).values.cpu()
    return top2[:, 0] - top2[:, 1]


def sample_next(
    logits_bv: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row of logits [b, vocab] -> [b] (int64, on the CPU)."""
    logits_bv = logits_bv.float().cpu()
    if params.greedy:
        return logits_bv.argmax(dim=-1)
    probs = torch.softmax(logits_bv / params.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


class Generator:
    """Generates answers with this rank's model chunk (``SailVLModel``; one chunk, no virtual PP)."""

    def __init__(self, model, pad_token_id: int = 0, vision_chunk_tiles: int | None = None):
        """``vision_chunk_tiles``: tiles per ViT call in the prefill (default: all at once on GPU, one
        at a time on CPU, where the local attention's [tiles x heads, 1025, 1025] scores of a whole
        batch fall out of cache: 48 tiles ran 3.5-5x faster one by one; results are the same)."""
        self.model = model.eval()
        self.lm = model.language_model
        self.pad_token_id = pad_token_id
        self.first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.vision_chunk_tiles = vision_chunk_tiles or (1 if self.device.type == "cpu" else None)

    # -- one forward of this stage ------------------------------------------------------------------

    def _embed(self, ids_bs: torch.Tensor, pixels: torch.Tensor | None, prompt_width: int) -> torch.Tensor:
        """Token embeddings [s, b, h] with image embeddings at the prompt's <IMG_CONTEXT> positions
        (first stage; a generated <IMG_CONTEXT> is an ordinary token, as in transformers)."""
        positions = torch.arange(ids_bs.shape[1], device=ids_bs.device).expand_as(ids_bs)
        embeds_sbh = self.lm.embedding(input_ids=ids_bs, position_ids=positions)
        in_prompt = torch.arange(ids_bs.shape[1], device=ids_bs.device) < prompt_width
        mask_bs = (ids_bs == self.model.image_token_id) & in_prompt
        n_context = int(mask_bs.sum())
        if pixels is None:
            if n_context:
                raise ValueError(f"{n_context} <IMG_CONTEXT> tokens in the prompt but no image")
            return embeds_sbh
        pixels = pixels.to(self.device, self.dtype)
        chunks = pixels.split(self.vision_chunk_tiles) if self.vision_chunk_tiles else [pixels]
        images_nth = torch.cat([self.model.image_embeddings(chunk) for chunk in chunks])
        if n_context != images_nth.shape[0] * images_nth.shape[1]:
            raise ValueError(
                f"{n_context} <IMG_CONTEXT> tokens but {images_nth.shape[0]} tiles x "
                f"{images_nth.shape[1]} image embeddings"
            )
        embeds_bsh = embeds_sbh.transpose(0, 1).masked_scatter(
            mask_bs.unsqueeze(-1), images_nth.to(embeds_sbh.dtype)
        )
        return embeds_bsh.transpose(0, 1).contiguous()

    def _stage_forward(self, ids_bs, pixels, mask, context, prompt_width: int) -> torch.Tensor | None:
        """Run this stage; returns full-vocab logits [b, vocab] of the last position on the last
        stage, None elsewhere (hidden states go to the next stage)."""
        b, s = ids_bs.shape
        decoder_input = None
        if self.first:
            decoder_input = self._embed(ids_bs, pixels, prompt_width)
        else:
            hidden = torch.empty(s, b, self.lm.config.hidden_size, dtype=self.dtype, device=self.device)
            recv_from_prev_pipeline_rank_(hidden)
            self.model.set_input_tensor(hidden)
        positions = torch.arange(s, device=self.device).expand(b, -1)
        out = self.lm(
            input_ids=ids_bs,
            position_ids=positions,
            attention_mask=mask,
            decoder_input=decoder_input,
            inference_context=context,
            runtime_gather_output=True,
        )  # full-vocab logits
        if not self.last:
            send_to_next_pipeline_rank(out.contiguous())
            return None
        return out[:, -1, :]

    def _broadcast_tokens(self, tokens_b: torch.Tensor | None, batch: int, dtype=torch.int64) -> torch.Tensor:
        """The last stage's sampled tokens (or any [b] tensor of ``dtype``) on every rank of the
        pipeline group."""
        if self.pp_size == 1:
            return tokens_b
        buf = (
            tokens_b.to(self.device)
            if self.last
            else torch.empty(batch, dtype=dtype, device=self.device)
        )
        dist.broadcast(
            buf,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        return buf.cpu()

    # -- the loop -----------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self, requests: list[Request], params: SamplingParams, use_cache: bool = True
    ) -> list[GenerationResult]:
        """Answer a batch of prompts; every rank of the model-parallel group passes the same requests.

        With ``use_cache=False`` each step recomputes the whole sequence (the reference the cache is
        measured and tested against).
        """
        params.validate()
        b = len(requests)
        lengths = [len(r.input_ids) for r in requests]
        width = max(lengths)
        ids = torch.full((b, width), self.pad_token_id, dtype=torch.int64)
        for i, r in enumerate(requests):
            ids[i, width - lengths[i] :] = torch.tensor(r.input_ids, dtype=torch.int64)
        pad_bs = torch.arange(width)[None, :] < torch.tensor([width - n for n in lengths])[:, None]
        padded = bool(pad_bs.any())
        explicit_mask = not self.model.use_te  # TE: equal-length prompts only, its own causal masking
        if padded and self.model.use_te:
            raise ValueError(
                "prompts of different lengths need the local attention (transformer_impl=local): "
                "Transformer Engine's causal kernel ignores the padding mask"
            )
        tiles = [r.pixel_values for r in requests if r.pixel_values is not None]
        pixels = torch.cat(tiles) if tiles else None
        generator = torch.Generator().manual_seed(params.seed)
        stats = GenerationStats(prompt_tokens=sum(lengths))
        total = width + params.max_new_tokens
        context = StaticInferenceContext(b, total) if use_cache else None
        out_tokens: list[list[int]] = [[] for _ in range(b)]
        out_gaps: list[list[float]] = [[] for _ in range(b)]
        done = [False] * b
        stop = set(params.stop_token_ids)

        seq = ids.to(self.device)
        step_ids = seq
        for step in range(params.max_new_tokens):
            start = time.perf_counter()
            keys = seq.shape[1]
            key_pad = torch.cat([pad_bs, torch.zeros(b, keys - width, dtype=torch.bool)], 1)
            queries = step_ids.shape[1]
            causal = torch.ones(queries, keys, dtype=torch.bool).triu(keys - queries + 1)
            mask = (causal[None, None] | key_pad[:, None, None, :]).to(self.device) if explicit_mask else None
            prefill = step == 0 or context is None
            logits = self._stage_forward(
                step_ids, pixels if prefill else None, mask, context, width if prefill else 0
            )
            tokens = sample_next(logits, params, generator) if self.last else None
            tokens = self._broadcast_tokens(tokens, b)
            gaps = self._broadcast_tokens(top_logit_gap(logits) if self.last else None, b, torch.float32)
            for i in range(b):
                if not done[i]:
                    out_tokens[i].append(int(tokens[i]))
                    out_gaps[i].append(float(gaps[i]))
                    done[i] = int(tokens[i]) in stop
            elapsed = time.perf_counter() - start
            if step == 0:
                stats.prefill_s += elapsed
            else:
                stats.decode_s += elapsed
            if all(done):
                break
            new = tokens.to(self.device)[:, None]
            seq = torch.cat([seq, new], dim=1)
            if context is not None:
                context.sequence_len_offset += step_ids.shape[1]
                context.enable_decode_mode()
                step_ids = new
            else:
                step_ids = seq
        stats.new_tokens = sum(len(t) for t in out_tokens)
        return [
            GenerationResult(t, d, stats, g) for t, d, g in zip(out_tokens, done, out_gaps, strict=True)
        ]
