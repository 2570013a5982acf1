"""The one place preprocessing touches the dataset builder (`megasail.data.format.writer`)."""

from __future__ import annotations

import time
from collections.abc import Container, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from megasail.data.preprocess.samples import EncodedSample


def open_shard_writer(prefix: str, backend: str = "auto", sync: bool = True):
    """A ShardWriter for `prefix`: the native one ("cpp"), the pure-Python one ("python"), or the
    native one when it is built ("auto"). Both write byte-identical files; `sync=False` skips the
    fsyncs at finalize (see format.writer.ShardWriter)."""
    from megasail.data.format import writer as dataset_writer

    if backend == "python":
        return dataset_writer.PyShardWriter(prefix, sync=sync)
    if backend == "cpp":
        return dataset_writer.ShardWriter(prefix, sync=sync)
    try:
        return dataset_writer.ShardWriter(prefix, sync=sync)
    except ImportError:  # native extension not built: same bytes, slower
        return dataset_writer.PyShardWriter(prefix, sync=sync)


def write_sample(writer, sample: EncodedSample, source_id: int) -> None:
    images = sample.images
    writer.add_sample(
        sample.tokens,
        sample.segment_lengths,
        sample.segment_modes,
        [im.data for im in images],
        np.asarray([im.width for im in images], dtype=np.uint32),
        np.asarray([im.height for im in images], dtype=np.uint32),
        np.asarray([im.format for im in images], dtype=np.uint8),
        source_id,
    )


class StreamingMerge:
    """Merges unit shards into the output prefix in unit order, each as soon as it and every unit
    before it are finished, on a helper thread (the C++ merger copies without the GIL), so the
    merge runs alongside the units still being processed and little of it is left at the end.
    The bytes are those of format.writer.merge_shards over all units in order; memory stays flat
    whatever the number of samples (the merger spills its index to disk).

        merge = StreamingMerge(prefix, [(unit.index, shard_prefix), ...])   # in unit order
        merge.feed(finished)   # whenever units finish: finished holds their indexes
        merge.finish()         # after the last unit: waits for the copies, fsyncs, renames
        merge.abort()          # on failure: removes the output's .tmp files
    """

    def __init__(self, out_prefix: str, shards: Sequence[tuple[int, str]]):
        from megasail.data.format import writer as dataset_writer

        self._shards = list(shards)
        self._next = 0
        self._merger = dataset_writer.ShardMerger(out_prefix)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="megasail-merge")
        self._futures = []
        self.busy_seconds = 0.0  # time spent inside the merger (copies, fsync, indexes)

    def _append(self, shard_prefix: str) -> None:
        t0 = time.perf_counter()
        try:
            self._merger.append(shard_prefix)
        finally:
            self.busy_seconds += time.perf_counter() - t0

    def feed(self, finished: Container[int]) -> None:
        """Queue every shard whose unit and all earlier units are in `finished`; raise the first merge
        failure as soon as it is known (not only at finish())."""
        self.check()
        while self._next < len(self._shards) and self._shards[self._next][0] in finished:
            self._futures.append(self._pool.submit(self._append, self._shards[self._next][1]))
            self._next += 1

    def check(self) -> None:
        """Raise the error of the first failed copy, if one has failed; forget the copies that are done."""
        pending = []
        for future in self._futures:
            if not future.done():
                pending.append(future)
            elif future.exception() is not None:
                raise future.exception()
        self._futures = pending

    def finish(self) -> int:
        """Wait for the queued copies (raising the first failure), then fsync and publish."""
        if self._next != len(self._shards):
            raise RuntimeError(f"merge finished with {len(self._shards) - self._next} unit shards not fed")
        for future in self._futures:
            future.result()
        self._pool.shutdown()
        t0 = time.perf_counter()
        try:
            return self._merger.finalize()
        finally:
            self.busy_seconds += time.perf_counter() - t0

    def abort(self) -> None:
        """Drop queued copies, wait for the one running (one shard at most), remove the .tmp files."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._merger.abort()
