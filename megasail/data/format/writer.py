"""Writers of the indexed multimodal dataset format (docs/data_format.md).

`ShardWriter` wraps the C++ writer (buffered, GIL released while writing); `PyShardWriter` is the
pure-Python writer of the same bytes, the reference the tests and benchmarks compare against.
Both write PREFIX.*.tmp files and rename them at `finalize()`; as context managers they finalize
on a clean exit and abort (remove the .tmp files) when the block raises. `sync=False` skips the
fsyncs at finalize: for temporary shards that `merge_shards` (which always fsyncs) copies later:

    with ShardWriter("out/shard_003") as writer:
        writer.add_sample(tokens, segment_lengths, segment_modes, images, widths, heights, formats, source_id)

The manifest (PREFIX.manifest.json) is not written here: preprocessing writes it after
finalize/merge, and its presence marks the prefix complete.
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import Sequence

import numpy as np

from megasail.data.format.reader import (
    IMAGE_FORMAT_JPEG,
    IMAGE_FORMAT_OTHER,
    IMAGE_FORMAT_PNG,
    IMAGE_INDEX_MAGIC,
    IMAGE_INDEX_VERSION,
    SEGMENT_IMAGE,
    SEGMENT_PROMPT,
    SEGMENT_TARGET,
    TOKEN_DTYPE_CODE,
    TOKEN_INDEX_MAGIC,
    TOKEN_INDEX_VERSION,
    data_paths,
    image_bin_path,
    image_idx_path,
    padded_to_8,
    read_image_index,
    read_token_index,
    token_bin_path,
    token_idx_path,
)

_U32_MAX = 2**32 - 1


def image_format_code(data: bytes | memoryview) -> int:
    """Format code from the leading bytes (never from a file name): 1 JPEG, 2 PNG, 3 anything else."""
    head = bytes(data[:8])
    if head[:3] == b"\xff\xd8\xff":
        return IMAGE_FORMAT_JPEG
    if head == b"\x89PNG\r\n\x1a\n":
        return IMAGE_FORMAT_PNG
    return IMAGE_FORMAT_OTHER


def _as_1d(values, dtype, name: str) -> np.ndarray:
    """values as a contiguous 1-D array of dtype; refuses values the dtype cannot hold."""
    if (
        type(values) is np.ndarray
        and values.dtype == dtype
        and values.ndim == 1
        and values.flags.c_contiguous
    ):
        return values  # the common case, taken without further conversions
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.dtype == dtype:
        return np.ascontiguousarray(array)
    if array.size == 0:
        return np.zeros(0, dtype=dtype)
    if array.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    info = np.iinfo(dtype)
    if array.min() < info.min or array.max() > info.max:
        raise ValueError(f"{name} has values outside {np.dtype(dtype).name} [{info.min}, {info.max}]")
    return array.astype(dtype)


class _FinalizeOnExit:
    """Context manager: finalize on a clean exit, abort (remove the .tmp files) when the block raises."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self.is_open:
            self.finalize()


class _SampleWriterBase(_FinalizeOnExit):
    """Argument handling shared by both writers."""

    def add_sample(
        self,
        tokens,
        segment_lengths,
        segment_modes,
        images: Sequence[bytes] = (),
        widths=(),
        heights=(),
        formats=None,
        source_id: int = 0,
    ) -> None:
        """Append one sample (one document; one sequence per segment).

        Args:
            tokens: int32[T], all segments back to back; an IMAGE segment holds its image ordinal k.
            segment_lengths: int32[S], summing to T; IMAGE segments have length 1.
            segment_modes: int8[S], 0 PROMPT, 1 TARGET, 2 IMAGE.
            images: M bytes-like encoded images, M = number of IMAGE segments, in ordinal order.
            widths, heights: uint32[M] pixel size of each image.
            formats: uint8[M] (1 JPEG, 2 PNG, 3 other); None sniffs them from the bytes.
            source_id: u32 id of the source file the sample came from.

        Raises ValueError (writer unchanged) when the sample is inconsistent.
        """
        if formats is None:
            formats = [image_format_code(image) for image in images]
        if not 0 <= int(source_id) <= _U32_MAX:
            raise ValueError(f"source_id must fit in uint32, got {source_id}")
        self._add(
            _as_1d(tokens, np.int32, "tokens"),
            _as_1d(segment_lengths, np.int32, "segment_lengths"),
            _as_1d(segment_modes, np.int8, "segment_modes"),
            list(images),
            _as_1d(widths, np.uint32, "widths"),
            _as_1d(heights, np.uint32, "heights"),
            _as_1d(formats, np.uint8, "formats"),
            int(source_id),
        )

    def _add(self, tokens, segment_lengths, segment_modes, images, widths, heights, formats, source_id):
        raise NotImplementedError

    def finalize(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class ShardWriter(_SampleWriterBase):
    """C++ writer of one prefix (megasail._C.ShardWriter); see the module docstring.

    sync=True (default): finalize() fsyncs the four files before renaming them, so a published
    prefix survives a power loss. sync=False: a published prefix is complete for every process
    (also after this one is killed: the page cache outlives it) but may be lost or torn by a power
    loss or kernel crash; meant for temporary shards that a merge copies and fsyncs.
    """

    def __init__(self, prefix: str | os.PathLike, sync: bool = True):
        from megasail.data.format.native import C

        self._writer = C.ShardWriter(os.fspath(prefix), sync=bool(sync))

    def _add(self, tokens, segment_lengths, segment_modes, images, widths, heights, formats, source_id):
        self._writer.add_sample(
            tokens, segment_lengths, segment_modes, images, widths, heights, formats, source_id
        )

    def finalize(self) -> None:
        """Flush, fsync (unless sync=False), write both indexes, rename the .tmp files to their final names."""
        self._writer.finalize()

    def abort(self) -> None:
        """Remove the .tmp files (no-op after finalize)."""
        self._writer.abort()

    prefix = property(lambda self: self._writer.prefix)
    num_samples = property(lambda self: self._writer.num_samples)
    num_segments = property(lambda self: self._writer.num_segments)
    num_tokens = property(lambda self: self._writer.num_tokens)
    num_images = property(lambda self: self._writer.num_images)
    image_bytes = property(lambda self: self._writer.image_bytes)
    sync = property(lambda self: self._writer.sync)
    is_open = property(lambda self: self._writer.is_open)


def _validate_sample(
    sample: int, tokens, segment_lengths, segment_modes, images, widths, heights, formats
) -> None:
    """The checks the C++ writer makes, with the same messages."""

    def fail(what: str):
        raise ValueError(f"sample {sample}: {what}")

    if len(segment_lengths) != len(segment_modes):
        raise ValueError("segment_lengths and segment_modes differ in length")
    if not len(widths) == len(heights) == len(formats):
        raise ValueError("widths, heights and formats differ in length")
    if len(segment_lengths) == 0:
        fail("has no segments")
    if len(images) != len(widths):
        fail(f"{len(images)} images but {len(widths)} widths/heights/formats")
    covered, ordinal = 0, 0
    for g, (length, mode) in enumerate(zip(segment_lengths.tolist(), segment_modes.tolist(), strict=True)):
        if length < 0:
            fail(f"segment {g} has negative length")
        if mode == SEGMENT_IMAGE:
            if length != 1:
                fail(f"image segment {g} must hold exactly one token")
            if covered >= len(tokens) or tokens[covered] != ordinal:
                fail(f"image segment {g} must hold image ordinal {ordinal}")
            ordinal += 1
        elif mode not in (SEGMENT_PROMPT, SEGMENT_TARGET):
            fail(f"segment {g} has unknown mode {mode}")
        covered += length
    if covered != len(tokens):
        fail(f"segment lengths sum to {covered}, tokens hold {len(tokens)}")
    if ordinal != len(images):
        fail(f"{ordinal} image segments but {len(images)} images")
    for m in range(len(images)):
        if widths[m] == 0 or heights[m] == 0:
            fail(f"image {m} has zero width or height")
        if not IMAGE_FORMAT_JPEG <= formats[m] <= IMAGE_FORMAT_OTHER:
            fail(f"image {m} has unknown format code {formats[m]}")


def _write_synced(path: str, chunks: Sequence[bytes | np.ndarray], sync: bool = True) -> None:
    with open(path, "wb") as f:
        for chunk in chunks:
            f.write(chunk.tobytes() if isinstance(chunk, np.ndarray) else chunk)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def _write_token_index(
    path: str, lengths: np.ndarray, doc_index: np.ndarray, modes: np.ndarray, sync: bool = True
) -> None:
    """PREFIX.idx from int32 lengths[S], int64 doc_index[D+1], int8 modes[S] (pointers derived)."""
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * 4, out=pointers[1:])
    header = (
        TOKEN_INDEX_MAGIC
        + np.array([TOKEN_INDEX_VERSION], "<u8").tobytes()
        + bytes([TOKEN_DTYPE_CODE])
        + np.array([len(lengths), len(doc_index)], "<u8").tobytes()  # megatron-core stores D+1
    )
    _write_synced(
        path,
        [header, lengths.astype(np.int32), pointers, doc_index.astype(np.int64), modes.astype(np.int8)],
        sync,
    )


def _write_image_index(
    path: str, sizes, doc_image_start, widths, heights, crc32, doc_source, formats, sync: bool = True
) -> None:
    """PREFIX.img.idx from per-image and per-sample arrays (offsets derived from sizes)."""
    sizes = np.asarray(sizes, dtype=np.uint64)
    offsets = np.zeros(len(sizes), dtype=np.uint64)
    np.cumsum(sizes[:-1], out=offsets[1:])
    arrays = [
        offsets,
        sizes,
        np.asarray(doc_image_start, dtype=np.uint64),
        np.asarray(widths, dtype=np.uint32),
        np.asarray(heights, dtype=np.uint32),
        np.asarray(crc32, dtype=np.uint32),
        np.asarray(doc_source, dtype=np.uint32),
        np.asarray(formats, dtype=np.uint8),
    ]
    header = IMAGE_INDEX_MAGIC + np.array([IMAGE_INDEX_VERSION, len(sizes), len(doc_source)], "<u8").tobytes()
    _write_synced(path, [header] + [a.tobytes().ljust(padded_to_8(a.nbytes), b"\x00") for a in arrays], sync)


def _publish(prefix: str) -> None:
    for path in data_paths(prefix):  # indexes last, as the C++ writer does
        os.replace(path + ".tmp", path)


def _remove_tmp_files(prefix: str) -> None:
    for path in data_paths(prefix):
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")


class PyShardWriter(_SampleWriterBase):
    """Pure-Python writer of the same bytes as ShardWriter (the reference for tests and benchmarks);
    `sync` as for ShardWriter."""

    def __init__(self, prefix: str | os.PathLike, sync: bool = True):
        self.prefix = os.fspath(prefix)
        self.sync = bool(sync)
        self._tokens_file = open(token_bin_path(self.prefix) + ".tmp", "wb")
        self._images_file = open(image_bin_path(self.prefix) + ".tmp", "wb")
        self._lengths: list[np.ndarray] = []
        self._modes: list[np.ndarray] = []
        self._doc_index = [0]
        self._image_sizes: list[int] = []
        self._widths: list[np.ndarray] = []
        self._heights: list[np.ndarray] = []
        self._crc32: list[int] = []
        self._formats: list[np.ndarray] = []
        self._doc_image_start = [0]
        self._doc_source: list[int] = []
        self.num_segments = self.num_tokens = self.image_bytes = 0
        self.is_open = True

    num_samples = property(lambda self: len(self._doc_source))
    num_images = property(lambda self: len(self._image_sizes))

    def _add(self, tokens, segment_lengths, segment_modes, images, widths, heights, formats, source_id):
        if not self.is_open:
            raise RuntimeError(f"PyShardWriter({self.prefix}) is closed")
        _validate_sample(
            self.num_samples, tokens, segment_lengths, segment_modes, images, widths, heights, formats
        )
        self._tokens_file.write(tokens.tobytes())
        for image in images:
            self._images_file.write(image)
            self._image_sizes.append(len(memoryview(image).cast("B")))
            self._crc32.append(zlib.crc32(image))
        self._lengths.append(segment_lengths)
        self._modes.append(segment_modes)
        self._widths.append(widths)
        self._heights.append(heights)
        self._formats.append(formats)
        self.num_segments += len(segment_lengths)
        self.num_tokens += len(tokens)
        self.image_bytes += sum(self._image_sizes[len(self._image_sizes) - len(images) :])
        self._doc_index.append(self.num_segments)
        self._doc_image_start.append(len(self._image_sizes))
        self._doc_source.append(source_id)

    def finalize(self) -> None:
        if not self.is_open:
            raise RuntimeError(f"PyShardWriter({self.prefix}) is closed")
        try:
            for f in (self._tokens_file, self._images_file):
                f.flush()
                if self.sync:
                    os.fsync(f.fileno())
                f.close()
            _write_token_index(
                token_idx_path(self.prefix) + ".tmp",
                np.concatenate([np.zeros(0, np.int32), *self._lengths]),
                np.array(self._doc_index, dtype=np.int64),
                np.concatenate([np.zeros(0, np.int8), *self._modes]),
                self.sync,
            )
            _write_image_index(
                image_idx_path(self.prefix) + ".tmp",
                self._image_sizes,
                self._doc_image_start,
                np.concatenate([np.zeros(0, np.uint32), *self._widths]),
                np.concatenate([np.zeros(0, np.uint32), *self._heights]),
                self._crc32,
                self._doc_source,
                np.concatenate([np.zeros(0, np.uint8), *self._formats]),
                self.sync,
            )
            _publish(self.prefix)
        except BaseException:
            self.abort()
            raise
        self.is_open = False

    def abort(self) -> None:
        if not self.is_open:
            return
        self._tokens_file.close()
        self._images_file.close()
        _remove_tmp_files(self.prefix)
        self.is_open = False


def write_text_prefix(
    prefix: str | os.PathLike,
    tokens,
    segment_lengths,
    segment_modes,
    doc_index,
    doc_source=None,
    sync: bool = True,
) -> int:
    """Write a text-only prefix from whole arrays in one go (no per-sample calls); returns its samples.

    For tools and tests that need millions of samples quickly; the bytes equal those of a writer
    given the same samples one by one. No manifest is written.

    Args:
        tokens: int32[T], every segment back to back.
        segment_lengths: int32[S], summing to T.
        segment_modes: int8[S], PROMPT (0) or TARGET (1) only.
        doc_index: int64[N+1], sample d holds segments doc_index[d]..doc_index[d+1]; 0 first, S last.
        doc_source: uint32[N] source id of each sample (default all 0).
    """
    prefix = os.fspath(prefix)
    tokens = _as_1d(tokens, np.int32, "tokens")
    lengths = _as_1d(segment_lengths, np.int32, "segment_lengths")
    modes = _as_1d(segment_modes, np.int8, "segment_modes")
    doc_index = _as_1d(doc_index, np.int64, "doc_index")
    num_samples = len(doc_index) - 1
    doc_source = (
        np.zeros(max(num_samples, 0), np.uint32)
        if doc_source is None
        else _as_1d(doc_source, np.uint32, "doc_source")
    )
    if len(lengths) != len(modes):
        raise ValueError(f"{len(lengths)} segment_lengths but {len(modes)} segment_modes")
    if np.any(lengths < 0) or int(lengths.sum(dtype=np.int64)) != len(tokens):
        raise ValueError(f"segment lengths must be >= 0 and sum to the {len(tokens)} tokens")
    if np.any((modes != SEGMENT_PROMPT) & (modes != SEGMENT_TARGET)):
        raise ValueError("write_text_prefix takes PROMPT (0) and TARGET (1) segments only")
    if (
        num_samples < 0
        or doc_index[0] != 0
        or doc_index[-1] != len(lengths)
        or np.any(np.diff(doc_index) < 1)
    ):
        raise ValueError("doc_index must run from 0 to the segment count, each sample holding >= 1 segment")
    if len(doc_source) != num_samples:
        raise ValueError(f"{len(doc_source)} doc_source entries for {num_samples} samples")
    try:
        _write_synced(token_bin_path(prefix) + ".tmp", [tokens], sync)
        _write_synced(image_bin_path(prefix) + ".tmp", [], sync)
        _write_token_index(token_idx_path(prefix) + ".tmp", lengths, doc_index, modes, sync)
        empty = np.zeros(0, np.uint32)
        _write_image_index(
            image_idx_path(prefix) + ".tmp",
            np.zeros(0, np.uint64),
            np.zeros(num_samples + 1, np.uint64),
            empty,
            empty,
            empty,
            doc_source,
            np.zeros(0, np.uint8),
            sync,
        )
        _publish(prefix)
    except BaseException:
        _remove_tmp_files(prefix)
        raise
    return num_samples


def merge_shards(
    shard_prefixes: Sequence[str | os.PathLike], out_prefix: str | os.PathLike, backend: str = "cpp"
) -> int:
    """Concatenate finished shards, in the given order, into out_prefix; returns its sample count.

    Segment pointers, document indexes, image offsets and per-sample image ranges are rebased;
    the output is byte-identical to writing every sample with one writer. Writes .tmp files,
    fsyncs and renames them (indexes last); the C++ backend copies the data files inside the
    kernel (copy_file_range) where the file system allows it. Shards need no manifest; write the merged manifest afterwards.
    backend: "cpp" (megasail._C) or "python" (merge_shards_ref, same bytes).
    """
    if backend not in ("cpp", "python"):
        raise ValueError(f"backend must be 'cpp' or 'python', got {backend!r}")
    prefixes, out = [os.fspath(p) for p in shard_prefixes], os.fspath(out_prefix)
    if backend == "python":
        return merge_shards_ref(prefixes, out)
    from megasail.data.format.native import C

    return C.merge_shards(prefixes, out)


class ShardMerger(_FinalizeOnExit):
    """merge_shards one shard at a time (C++, megasail._C.ShardMerger): append the finished shards
    in their final order, possibly while later ones are still being written, then finalize().
    The bytes equal merge_shards' (and so one writer's). `append` and `finalize` release the GIL,
    so a helper thread can merge while the caller's thread goes on. As a context manager it
    finalizes on a clean exit and aborts (removes the .tmp files) when the block raises.
    Its memory does not grow with the samples merged: each rebased index array is streamed to an
    unlinked scratch file beside the output and joined behind the index headers at finalize().
    """

    def __init__(self, out_prefix: str | os.PathLike):
        from megasail.data.format.native import C

        self._merger = C.ShardMerger(os.fspath(out_prefix))

    def append(self, shard_prefix: str | os.PathLike) -> None:
        self._merger.append(os.fspath(shard_prefix))

    def finalize(self) -> int:
        return self._merger.finalize()

    def abort(self) -> None:
        self._merger.abort()

    prefix = property(lambda self: self._merger.prefix)
    num_shards = property(lambda self: self._merger.num_shards)
    num_samples = property(lambda self: self._merger.num_samples)
    is_open = property(lambda self: self._merger.is_open)


def merge_shards_ref(shard_prefixes: Sequence[str], out_prefix: str) -> int:
    """Pure-Python merge_shards (readable reference; copies data files in 8 MiB chunks)."""
    if out_prefix in shard_prefixes:
        raise ValueError(f"merge output {out_prefix} is also one of its inputs")
    shards = [
        (read_token_index(token_idx_path(p)), read_image_index(image_idx_path(p))) for p in shard_prefixes
    ]
    for prefix, (ti, ii) in zip(shard_prefixes, shards, strict=True):
        if os.path.getsize(token_bin_path(prefix)) != int(ti.lengths.astype(np.int64).sum()) * 4:
            raise ValueError(f"{token_bin_path(prefix)}: size disagrees with its index")
        if os.path.getsize(image_bin_path(prefix)) != int(ii.sizes.sum()):
            raise ValueError(f"{image_bin_path(prefix)}: size disagrees with its index")
    try:
        for path_of in (token_bin_path, image_bin_path):
            with open(path_of(out_prefix) + ".tmp", "wb") as out:
                for prefix in shard_prefixes:
                    with open(path_of(prefix), "rb") as src:
                        shutil.copyfileobj(src, out, 8 << 20)
                out.flush()
                os.fsync(out.fileno())
        segment_base = np.cumsum([0] + [len(ti.lengths) for ti, _ in shards])
        image_base = np.cumsum([0] + [len(ii.sizes) for _, ii in shards])
        _write_token_index(
            token_idx_path(out_prefix) + ".tmp",
            np.concatenate([np.zeros(0, np.int32)] + [ti.lengths for ti, _ in shards]),
            np.concatenate(
                [[0]] + [ti.doc_index[1:] + base for (ti, _), base in zip(shards, segment_base, strict=False)]
            ),
            np.concatenate([np.zeros(0, np.int8)] + [ti.modes for ti, _ in shards]),
        )

        def joined(name: str, dtype) -> np.ndarray:
            return np.concatenate([np.zeros(0, dtype)] + [getattr(ii, name) for _, ii in shards])

        _write_image_index(
            image_idx_path(out_prefix) + ".tmp",
            joined("sizes", np.uint64),
            np.concatenate(
                [np.zeros(1, np.uint64)]
                + [
                    ii.doc_image_start[1:] + np.uint64(base)
                    for (_, ii), base in zip(shards, image_base, strict=False)
                ]
            ),
            joined("widths", np.uint32),
            joined("heights", np.uint32),
            joined("crc32", np.uint32),
            joined("doc_source", np.uint32),
            joined("formats", np.uint8),
        )
        _publish(out_prefix)
    except BaseException:
        _remove_tmp_files(out_prefix)
        raise
    return sum(len(ii.doc_source) for _, ii in shards)
