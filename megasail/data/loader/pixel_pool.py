"""Reused memory for the pixels of in-process micro-batches (``data.num_workers=0``).

A micro-batch's ``pixel_values`` is one float32 [tiles, 3, T, T] tensor (2.4 MB per 448px tile),
tens of MB: above glibc's mmap threshold, so a fresh one is newly mapped memory each time, and
the kernel's page faults and zeroing when decoding first writes it cost the in-process loader a
third of the decoding itself (measured with tools/bench_loader.py, docs/loader.md). The pool
hands out views of buffers it keeps, reusing one once nothing outside the pool holds its memory
(the trainer has dropped that batch and every view of it). Workers decode into shared memory
instead (see worker.shared_tensor), which the main process receives without a copy.
"""

from __future__ import annotations

import torch

GRAIN_NUMEL = 3 * 448 * 448 * 8  # capacities grow in steps of 8 tiles of 448px, so buffers fit later batches


def _storage_users(buffer: torch.Tensor) -> int | None:
    """References to the buffer's memory (tensors and views of any shape), or None where torch lacks the count."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)  # private since torch 2.1; checked, never assumed
    if use_count is None:
        return None
    return int(use_count(buffer.untyped_storage()._cdata))


class PixelBufferPool:
    """float32 tensors of a requested shape, backed by reused buffers (at most `keep` of them).

    take(shape) -> an uninitialised float32 tensor of `shape` (a view of a pooled buffer, or a new
    tensor when none is free and large enough). Nothing is reused while any tensor still refers to
    a buffer's memory, so a batch the trainer keeps is never overwritten.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._buffers: list[tuple[torch.Tensor, int]] = []  # (flat buffer, its use count when unreferenced)
        self.reused = 0  # takes served from a pooled buffer (for tests and benchmarks)

    def _free(self, buffer: torch.Tensor, idle: int) -> bool:
        users = _storage_users(buffer)
        return users is not None and users == idle

    def release(self) -> None:
        """Forget every kept buffer: its memory returns once no batch uses it (to measure a run's state)."""
        self._buffers = []

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for n in shape:
            numel *= n
        free = [i for i, (buffer, idle) in enumerate(self._buffers) if self._free(buffer, idle)]
        fits = [i for i in free if self._buffers[i][0].numel() >= numel]
        if fits:
            best = min(fits, key=lambda i: self._buffers[i][0].numel())
            self.reused += 1
            return self._buffers[best][0][:numel].view(shape)
        # nothing free fits: drop free buffers too small for this batch (the pool stays at `keep`)
        self._buffers = [b for i, b in enumerate(self._buffers) if i not in free]
        capacity = -(-numel // GRAIN_NUMEL) * GRAIN_NUMEL
        buffer = torch.empty(capacity, dtype=torch.float32)
        idle = _storage_users(buffer)
        if idle is not None:
            self._buffers.append((buffer, idle))
            del self._buffers[: max(0, len(self._buffers) - self.keep)]  # forget the oldest: their batches own them
        return buffer[:numel].view(shape)
