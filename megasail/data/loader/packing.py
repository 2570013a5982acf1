"""Packing samples into fixed-length sequences, and collating packed sequences into a model batch.

Stages: `TokenizedSample` (one sample, image slots expanded) -> `PackedSequence` (the samples of one
row, in order) -> batch dict (`collate_packed`):

    groups = pack_samples(lengths, seq_length=8192, seed=3)   # [array([4, 0, 9]), array([2, 7]), ...]
    batch = collate_packed([PackedSequence(samples_of_row) for ...], seq_length=8192, pad_token_id=0)

The batch follows `megasail.training.step.forward_step`: every sample of a row keeps its own
positions, labels and causal attention (from `cu_seqlens`), exactly as if it were run alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from megasail.data.format import index_helpers
from megasail.data.format.reader import TokenizedSample
from megasail.data.images.tiling import TOKENS_PER_TILE


def pack_samples(
    lengths, seq_length: int, seed: int = 0, window: int = index_helpers.DEFAULT_PACK_WINDOW,
    backend: str = "cpp",
) -> list[np.ndarray]:
    """Group samples into sequences of at most seq_length tokens without splitting or dropping any.

    Args:
        lengths: int[N] tokens of each sample (1 <= length <= seq_length).
        seq_length: token slots per packed sequence.
        seed: shuffle seed; the result is a pure function of (lengths, seq_length, seed, window).
        window: samples sorted together before best-fit placement (index_helpers.pack_samples).
        backend: "cpp" (megasail._C) or "python" (the readable reference; identical result).

    Returns:
        One int64 array per packed sequence with the indices of its samples; every index in
        0..N-1 appears exactly once. Raises ValueError naming the first sample longer than
        seq_length (or shorter than 1 token).
    """
    offsets, order = index_helpers.pack_samples(lengths, seq_length, seed, window=window, backend=backend)
    return np.split(order, offsets[1:-1]) if len(offsets) > 1 else []


def packing_efficiency(lengths, groups: Sequence[np.ndarray], seq_length: int) -> float:
    """Trained tokens / token slots of a packing (1.0 = no padding)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return float(lengths.sum()) / float(max(1, len(groups)) * seq_length)


@dataclass
class PackedSequence:
    """The samples of one packed row, in order, with the image tiles of each sample.

    `pixels` holds one float32 [tiles_k, 3, H, W] tensor per image of every sample, in order of
    appearance (may be empty for text-only rows, or when only the token side is collated).
    """

    samples: list[TokenizedSample]
    pixels: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.samples)

    @property
    def num_tiles(self) -> int:
        return sum(sum(s.image_tiles) for s in self.samples)


def check_image_tokens(sample: TokenizedSample, img_context_id: int) -> None:
    """Assert that a sample's <IMG_CONTEXT> count equals 256 x its tiles (what the decoder emits)."""
    context = int(np.count_nonzero(sample.input_ids == img_context_id))
    expected = TOKENS_PER_TILE * sum(sample.image_tiles)
    if context != expected:
        raise AssertionError(
            f"sample holds {context} <IMG_CONTEXT> tokens but its {len(sample.image_tiles)} images "
            f"have {sum(sample.image_tiles)} tiles = {expected} tokens"
        )


def concat_tiles(pixels: Sequence[torch.Tensor], allocator=None) -> torch.Tensor:
    """[sum tiles, 3, H, W] from per-image [tiles, 3, H, W] tensors, into allocator(shape) if given."""
    if allocator is None:
        return torch.cat(list(pixels))
    shape = (sum(int(p.shape[0]) for p in pixels), *pixels[0].shape[1:])
    return torch.cat(list(pixels), out=allocator(shape))


def sample_segments(sequence: PackedSequence, seq_length: int) -> list[int]:
    """Token count of each attention segment of a row: the samples, then padding (if any)."""
    lengths = [len(s.input_ids) for s in sequence.samples]
    used = sum(lengths)
    if used > seq_length:
        raise ValueError(f"packed sequence holds {used} tokens, more than seq_length {seq_length}")
    return lengths + ([seq_length - used] if used < seq_length else [])


def collate_packed(
    sequences: Sequence[PackedSequence],
    seq_length: int,
    pad_token_id: int,
    img_context_id: int | None = None,
    pixel_allocator: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
    pixel_values: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """Rows of packed samples -> the batch dict of `forward_step` (b = len(sequences), s = seq_length).

    Returns:
        input_ids int64 [b, s]: samples back to back, then pad_token_id.
        position_ids int64 [b, s]: 0, 1, ... restarting at every sample (and at the padding).
        labels int64 [b, s]: labels[t] = input_ids[t + 1] inside a sample; pad_token_id at a
            sample's last position and on padding.
        loss_mask float32 [b, s]: 1 where the label is a trained (TARGET) token of the same sample.
        cu_seqlens int32 [segments + 1]: offsets of every segment (samples and padding of each row)
            in the flattened [b * s] token stream: Transformer Engine's THD PackedSeqParams take it,
            and the local layers' block-causal mask is built from it on the training device
            (`megasail.models.packed_attention`; the padding is its own causal block). No [b, 1, s, s]
            mask is made here: it would be 64 MiB per 8192-token row.
        pixel_values float32 [tiles, 3, H, W] in order of appearance (row 0 first), or None.
        num_samples int64 [b]: samples in each row (padding excluded).

    pixel_allocator(shape) gives the float32 tensor the tiles are concatenated into (a DataLoader
    worker passes shared memory, so handing the batch to the main process copies no pixels).
    pixel_values, when given, already holds every row's tiles in order (the loader decodes straight
    into one tensor, `decode.decode_tiles(out=...)`): it is returned as is, nothing is concatenated,
    and `sequence.pixels` (views of it, or empty) only serve the per-row tile count checks.
    """
    b = len(sequences)
    input_ids = torch.full((b, seq_length), pad_token_id, dtype=torch.int64)
    labels = torch.full((b, seq_length), pad_token_id, dtype=torch.int64)
    loss_mask = torch.zeros((b, seq_length), dtype=torch.float32)
    position_ids = torch.zeros((b, seq_length), dtype=torch.int64)
    boundaries, pixels = [0], []
    for row, sequence in enumerate(sequences):
        segments = sample_segments(sequence, seq_length)
        at = 0
        for sample in sequence.samples:
            n = len(sample.input_ids)
            if img_context_id is not None:
                check_image_tokens(sample, img_context_id)
            ids = torch.from_numpy(sample.input_ids.astype(np.int64))
            input_ids[row, at : at + n] = ids
            labels[row, at : at + n - 1] = ids[1:]
            loss_mask[row, at : at + n - 1] = torch.from_numpy(sample.loss_mask[1:].astype(np.float32))
            at += n
        start = 0
        for length in segments:
            position_ids[row, start : start + length] = torch.arange(length)
            start += length
            boundaries.append(row * seq_length + start)
        expected_tiles = sequence.num_tiles
        got_tiles = sum(int(p.shape[0]) for p in sequence.pixels)
        if sequence.pixels and got_tiles != expected_tiles:
            raise AssertionError(f"row {row}: {got_tiles} decoded tiles, its samples expect {expected_tiles}")
        pixels.extend(sequence.pixels)
    if pixel_values is not None:
        total = sum(s.num_tiles for s in sequences)
        if int(pixel_values.shape[0]) != total:
            raise AssertionError(f"pixel_values holds {int(pixel_values.shape[0])} tiles, the samples expect {total}")
    elif pixels:
        pixel_values = concat_tiles(pixels, pixel_allocator)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "cu_seqlens": torch.tensor(boundaries, dtype=torch.int32),
        "pixel_values": pixel_values,
        "num_samples": torch.tensor([len(s.samples) for s in sequences], dtype=torch.int64),
    }
