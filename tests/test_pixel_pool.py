"""The in-process loader's pixel buffers: reused once a batch is dropped, never while anything holds them."""

from __future__ import annotations

import torch

from megasail.data.loader.pixel_pool import PixelBufferPool

SHAPE = (3, 3, 8, 8)


def _span(t: torch.Tensor) -> range:
    return range(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    x, y = _span(a), _span(b)
    return x.start < y.stop and y.start < x.stop


def test_a_dropped_batch_buffer_is_reused():
    """Fault caught: a pool that never reuses (every batch newly mapped memory again)."""
    pool = PixelBufferPool()
    first = pool.take(SHAPE)
    address = first.data_ptr()
    del first
    again = pool.take((2, 3, 8, 8))  # a smaller batch fits the same buffer
    assert again.data_ptr() == address and pool.reused == 1
    assert again.shape == (2, 3, 8, 8) and again.dtype == torch.float32 and again.is_contiguous()


def test_memory_still_referenced_is_never_handed_out_again():
    """A batch still held, or only a view of it (a tile, a reshaped copy-free alias), keeps its buffer.

    Fault caught: a pool that reuses a buffer without counting who still refers to its memory."""
    pool = PixelBufferPool()
    held = pool.take(SHAPE).fill_(1.0)
    other = pool.take(SHAPE).fill_(2.0)
    assert not _overlap(held, other)
    tile = other[1].view(-1)
    del other
    third = pool.take(SHAPE).fill_(3.0)
    assert not _overlap(third, tile) and not _overlap(third, held)
    assert bool((held == 1.0).all()) and bool((tile == 2.0).all()) and pool.reused == 0


def test_pool_keeps_at_most_keep_buffers():
    """Fault caught: a pool that remembers every buffer it made (memory grows with the run)."""
    pool = PixelBufferPool(keep=2)
    held = [pool.take(SHAPE) for _ in range(5)]
    assert len(pool._buffers) == 2
    del held
    assert pool.take(SHAPE) is not None and pool.reused == 1
