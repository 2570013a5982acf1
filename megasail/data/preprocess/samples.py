"""Parsed record -> the arrays one dataset sample is written as, with its exact token count.

A sample's length is its text tokens plus, per image, `num_image_tokens(width, height, max_tiles)`
(`<img>` + 256 per tile + `</img>`), i.e. exactly what the reader expands it to at that tile budget.
Over-long samples are rejected, or with `on_too_long="truncate"` cut from the end through text only:
an image slot is never cut (such a sample is rejected), and at least one target token must remain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megasail.data.images.tiling import num_image_tokens
from megasail.data.preprocess.images import ValidatedImage
from megasail.data.preprocess.records import ParsedRecord
from megasail.data.preprocess.rejects import RecordRejected
from megasail.data.text.template import SegmentMode, TemplateError, TokenizedSegment, tokenize_pieces
from megasail.data.text.tokenizer import MultimodalTokenizer


@dataclass
class EncodedSample:
    """Arrays in the writer's layout: image segments hold one token, the sample-local image ordinal."""

    tokens: np.ndarray  # int32[T]
    segment_lengths: np.ndarray  # int32[S]
    segment_modes: np.ndarray  # int8[S]
    images: list[ValidatedImage]
    text_tokens: int
    target_tokens: int
    image_tokens: int  # at max_tiles, <img>/</img> included
    truncated: bool

    @property
    def total_tokens(self) -> int:
        return self.text_tokens + self.image_tokens


def _length(segments: list[TokenizedSegment], image_lengths: list[int]) -> int:
    return sum(
        image_lengths[s.token_ids[0]] if s.mode == SegmentMode.IMAGE else len(s.token_ids) for s in segments
    )


def truncate_segments(
    segments: list[TokenizedSegment], image_lengths: list[int], max_len: int
) -> list[TokenizedSegment]:
    """Drop tokens from the end, through text only, until the sample fits; RecordRejected if it cannot."""
    segments = [TokenizedSegment(s.mode, list(s.token_ids)) for s in segments]
    excess = _length(segments, image_lengths) - max_len
    while excess > 0 and segments:
        last = segments[-1]
        if last.mode == SegmentMode.IMAGE:
            raise RecordRejected(
                "too_long",
                f"exceeds --max-seq-length {max_len} by {excess} tokens and truncating would cut an image",
            )
        cut = min(excess, len(last.token_ids))
        del last.token_ids[len(last.token_ids) - cut :]
        excess -= cut
        if not last.token_ids:
            segments.pop()
    while segments and segments[-1].mode == SegmentMode.PROMPT:
        segments.pop()  # a prompt after the last kept target teaches nothing
    if not any(s.mode == SegmentMode.TARGET for s in segments):
        raise RecordRejected(
            "too_long", f"no target token left after truncating to --max-seq-length {max_len}"
        )
    return segments


def encode_sample(
    parsed: ParsedRecord,
    template,
    tokenizer: MultimodalTokenizer,
    *,
    max_tiles: int,
    max_seq_length: int,
    on_too_long: str,
    system_message: str | None,
) -> EncodedSample:
    """Render, tokenize and length-check one record; RecordRejected on any failure."""
    try:
        pieces = template.render(parsed.conversation, system=system_message)
    except TemplateError as e:
        raise RecordRejected(e.reason, str(e)) from None
    segments = tokenize_pieces(pieces, tokenizer)
    image_lengths = [num_image_tokens(im.width, im.height, max_tiles) for im in parsed.images]
    total = _length(segments, image_lengths)
    truncated = False
    if total > max_seq_length:
        if on_too_long != "truncate":
            raise RecordRejected(
                "too_long",
                f"{total} tokens > --max-seq-length {max_seq_length} "
                f"(images counted at --max-tiles {max_tiles})",
            )
        segments = truncate_segments(segments, image_lengths, max_seq_length)
        truncated = True
    flat = [t for s in segments for t in s.token_ids]
    text_tokens = sum(len(s.token_ids) for s in segments if s.mode != SegmentMode.IMAGE)
    return EncodedSample(
        tokens=np.asarray(flat, dtype=np.int32),
        segment_lengths=np.asarray([len(s.token_ids) for s in segments], dtype=np.int32),
        segment_modes=np.asarray([int(s.mode) for s in segments], dtype=np.int8),
        images=parsed.images,
        text_tokens=text_tokens,
        target_tokens=sum(len(s.token_ids) for s in segments if s.mode == SegmentMode.TARGET),
        image_tokens=sum(image_lengths),
        truncated=truncated,
    )
