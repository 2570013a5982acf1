"""Per-sample token and tile counts of any subset of a dataset's samples, from its index alone.

Work and memory are proportional to the subset (plus its segments and images), never to the
dataset, so a loader over hundreds of millions of samples never holds a per-sample array.
"""

from __future__ import annotations

import numpy as np

from megasail.data.format.reader import SEGMENT_IMAGE, IndexedMultimodalDataset
from megasail.data.images.tiling import IMAGE_WRAPPER_TOKENS, TILE_SIZE, TOKENS_PER_TILE, num_tiles


def _ragged(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices of every range starts[i]:stops[i], the range each belongs to)."""
    counts = (stops - starts).astype(np.int64)
    owner = np.repeat(np.arange(len(counts)), counts)
    first = np.cumsum(counts) - counts  # flat position where each range begins
    flat = starts.astype(np.int64)[owner] + (np.arange(int(counts.sum()), dtype=np.int64) - first[owner])
    return flat, owner


class SampleCounter:
    """Counts of one dataset at one tiling setting; tile counts per distinct image size are cached."""

    def __init__(self, dataset: IndexedMultimodalDataset, max_tiles: int, min_tiles: int = 1,
                 tile_size: int = TILE_SIZE):
        self.dataset = dataset
        self.tiling = (max_tiles, min_tiles, tile_size)
        self._tiles_of_size: dict[int, int] = {}

    def _image_tiles(self, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
        keys = (widths.astype(np.uint64) << np.uint64(32)) | heights.astype(np.uint64)
        unique, which = np.unique(keys, return_inverse=True)
        for key in unique.tolist():
            if key not in self._tiles_of_size:
                self._tiles_of_size[key] = num_tiles(key >> 32, key & 0xFFFFFFFF, *self.tiling)
        per_size = np.array([self._tiles_of_size[k] for k in unique.tolist()], dtype=np.int64)
        return per_size[which.reshape(-1)] if len(keys) else np.zeros(0, dtype=np.int64)

    def range_counts(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """counts(arange(lo, hi)) from contiguous slices of the index (cumulative sums, no gathers)."""
        ti, ii = self.dataset._token_index, self.dataset._image_index
        doc = ti.doc_index[lo : hi + 1].astype(np.int64)
        segments = slice(int(doc[0]), int(doc[-1]))
        text_lengths = np.where(ti.modes[segments] != SEGMENT_IMAGE, ti.lengths[segments], 0).astype(np.int64)
        text = np.diff(np.concatenate([[0], np.cumsum(text_lengths)])[doc - doc[0]])
        starts = ii.doc_image_start[lo : hi + 1].astype(np.int64)
        images = slice(int(starts[0]), int(starts[-1]))
        per_image = self._image_tiles(ii.widths[images], ii.heights[images])
        tiles = np.diff(np.concatenate([[0], np.cumsum(per_image)])[starts - starts[0]])
        num_images = np.diff(starts)
        return text + TOKENS_PER_TILE * tiles + IMAGE_WRAPPER_TOKENS * num_images, tiles

    def counts(self, samples) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int64[m], tiles int64[m]) of the given samples after image expansion: text tokens
        plus, per image, 256 x tiles (thumbnail included) + <img></img>."""
        samples = np.asarray(samples, dtype=np.int64).reshape(-1)
        ti, ii = self.dataset._token_index, self.dataset._image_index
        segments, owner = _ragged(ti.doc_index[samples], ti.doc_index[samples + 1])
        text_lengths = np.where(ti.modes[segments] != SEGMENT_IMAGE, ti.lengths[segments], 0)
        text = np.bincount(owner, weights=text_lengths, minlength=len(samples)).astype(np.int64)
        starts = ii.doc_image_start.astype(np.int64)
        images, image_owner = _ragged(starts[samples], starts[samples + 1])
        tiles_per_image = self._image_tiles(ii.widths[images], ii.heights[images])
        tiles = np.bincount(image_owner, weights=tiles_per_image, minlength=len(samples)).astype(np.int64)
        num_images = np.bincount(image_owner, minlength=len(samples)).astype(np.int64)
        return text + TOKENS_PER_TILE * tiles + IMAGE_WRAPPER_TOKENS * num_images, tiles
