"""Chat prompts for generation: the dataset's template and InternVL dynamic tiling, as in training.

A question (with earlier turns and images) is rendered by the same template preprocessing used
(``megasail.data.text.template``), cut right after the final ``<|im_start|>assistant\\n`` (where
the answer starts), tokenized with image slots expanded to ``<img>`` + 256 * tiles
``<IMG_CONTEXT>`` + ``</img>``; images are decoded and tiled by ``decode_tiles``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megasail.data.images.decode import decode_tiles
from megasail.data.images.tiling import DEFAULT_MAX_TILES, TILE_SIZE, TOKENS_PER_TILE
from megasail.data.text.template import (
    Conversation,
    SegmentMode,
    Turn,
    expand_segments,
    get_template,
    tokenize_pieces,
)
from megasail.data.text.tokenizer import IM_END, MultimodalTokenizer


@dataclass
class PromptSettings:
    """What a checkpoint's data was prepared with (template, system message, tiling)."""

    template: str = "sailvl-chat"
    system_message: str | None = None
    max_tiles: int = DEFAULT_MAX_TILES
    min_tiles: int = 1
    tile_size: int = TILE_SIZE
    tokens_per_tile: int = TOKENS_PER_TILE
    decode_backend: str = "pil"


def stop_token_ids(tokenizer: MultimodalTokenizer) -> tuple[int, ...]:
    """Tokens that end an answer: ``<|im_end|>`` (what every template trains as the last target),
    and ``<|endoftext|>`` when the vocabulary has it."""
    ids = [tokenizer.token_id(IM_END)]
    try:
        ids.append(tokenizer.token_id("<|endoftext|>"))
    except KeyError:
        pass
    return tuple(ids)


def pad_token_id(tokenizer: MultimodalTokenizer) -> int:
    """The id generation pads finished and shorter rows with: ``<|endoftext|>`` when the vocabulary has
    it, else 0 (padding is masked out, so any id is correct; this one keeps logs readable)."""
    try:
        return tokenizer.token_id("<|endoftext|>")
    except KeyError:
        return 0


def _answer_prefix(pieces):
    """Pieces up to where the final answer's text starts: drop the trailing separator, then the
    final answer (its target pieces)."""
    end = len(pieces)
    while end and pieces[end - 1].mode != SegmentMode.TARGET:
        end -= 1
    while end and pieces[end - 1].mode == SegmentMode.TARGET:
        end -= 1
    return pieces[:end]


def build_prompt(
    tokenizer: MultimodalTokenizer,
    settings: PromptSettings,
    question: str,
    images: Sequence[bytes] = (),
    history: Sequence[tuple[str, str]] = (),
) -> tuple[list[int], torch.Tensor | None]:
    """(input_ids, pixel_values [tiles, 3, T, T] or None) for ``question`` after ``history``
    ((question, answer) pairs). Images belong to the conversation's first user turn unless the
    texts carry ``<image>`` tags; an unreadable image raises ``ImageDecodeError``."""
    tiles = decode_tiles(
        list(images),
        settings.max_tiles,
        backend=settings.decode_backend,
        tile_size=settings.tile_size,
        min_tiles=settings.min_tiles,
        on_error="raise",
    )
    return build_prompt_from_tiles(tokenizer, settings, question, [t.cpu() for t in tiles], history)


def build_prompt_from_tiles(
    tokenizer: MultimodalTokenizer,
    settings: PromptSettings,
    question: str,
    tiles: Sequence[torch.Tensor] = (),
    history: Sequence[tuple[str, str]] = (),
) -> tuple[list[int], torch.Tensor | None]:
    """``build_prompt`` for images already decoded and tiled (one [n_i, 3, T, T] tensor per image,
    e.g. from one ``decode_tiles`` call over a whole batch); pixel_values stay on their device."""
    turns = []
    for q, a in history:
        turns += [Turn("user", q), Turn("assistant", a)]
    turns += [Turn("user", question), Turn("assistant", "x")]  # placeholder answer, cut off below
    template = get_template(settings.template)
    pieces = _answer_prefix(
        template.render(Conversation(tuple(turns), len(tiles)), system=settings.system_message)
    )
    segments = tokenize_pieces(pieces, tokenizer)
    image_tokens = [t.shape[0] * settings.tokens_per_tile + 2 for t in tiles]
    input_ids, _ = expand_segments(segments, tokenizer, image_tokens)
    pixels = torch.cat(list(tiles)) if len(tiles) else None
    return input_ids, pixels
