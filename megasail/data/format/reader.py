"""Reader of the indexed multimodal dataset format (docs/data_format.md).

A prefix is four memory-mapped files plus a manifest: tokens and their megatron-core index
(PREFIX.bin/.idx), image bytes and their index (PREFIX.img.bin/.img.idx), PREFIX.manifest.json.
Every lookup is O(1): nothing is read until a sample is asked for.

    ds = IndexedMultimodalDataset("data/caption_00")
    sample = ds[123]                       # MultimodalSample: segments and ImageRefs
    tokens = ds.expand(123, max_tiles=12)  # TokenizedSample: input_ids, loss_mask, image_tiles
    lengths = ds.token_counts(max_tiles=12)  # int64[N], for packing without decoding
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass

import numpy as np

from megasail.data.format.codes import IMAGE_FORMAT_NAMES, TOKEN_DTYPE_CODE, ImageFormat, SegmentMode  # noqa: F401
from megasail.data.images.tiling import TILE_SIZE, TOKENS_PER_TILE, num_image_tokens, num_tiles

TOKEN_INDEX_MAGIC = b"MMIDIDX\x00\x00"
TOKEN_INDEX_VERSION = 1
TOKEN_INDEX_HEADER_BYTES = 34  # magic 9 + version 8 + dtype 1 + sequence count 8 + document-index length 8
IMAGE_INDEX_MAGIC = b"MSIMGIDX"
IMAGE_INDEX_VERSION = 1
IMAGE_INDEX_HEADER_BYTES = 32  # magic 8 + version 8 + image count 8 + sample count 8

# The enums' members under the names the writer and inspect_dataset use (defined in format/codes.py).
SEGMENT_PROMPT, SEGMENT_TARGET, SEGMENT_IMAGE = SegmentMode.PROMPT, SegmentMode.TARGET, SegmentMode.IMAGE
IMAGE_FORMAT_JPEG, IMAGE_FORMAT_PNG, IMAGE_FORMAT_OTHER = ImageFormat.JPEG, ImageFormat.PNG, ImageFormat.OTHER


class IncompleteDatasetError(FileNotFoundError):
    """A prefix whose manifest (written last by preprocessing) or data files are missing."""


def token_bin_path(prefix: str) -> str:
    return f"{prefix}.bin"


def token_idx_path(prefix: str) -> str:
    return f"{prefix}.idx"


def image_bin_path(prefix: str) -> str:
    return f"{prefix}.img.bin"


def image_idx_path(prefix: str) -> str:
    return f"{prefix}.img.idx"


def manifest_path(prefix: str) -> str:
    return f"{prefix}.manifest.json"


def data_paths(prefix: str) -> list[str]:
    """The four data files of a prefix, in the order finalize publishes them."""
    return [token_bin_path(prefix), image_bin_path(prefix), image_idx_path(prefix), token_idx_path(prefix)]


def padded_to_8(nbytes: int) -> int:
    """Bytes an array of `nbytes` takes in PREFIX.img.idx (every array starts 8-byte aligned)."""
    return (nbytes + 7) // 8 * 8


def _map(path: str, dtype) -> np.ndarray:
    """Read-only memory map of a whole file (an empty array for an empty file, which mmap refuses)."""
    if os.path.getsize(path) == 0:
        return np.empty(0, dtype=dtype)
    return np.asarray(np.memmap(path, dtype=dtype, mode="r"))


@dataclass(frozen=True)
class TokenIndex:
    """PREFIX.idx as arrays: S segments, D samples."""

    lengths: np.ndarray  # int32[S]
    pointers: np.ndarray  # int64[S] byte offset of each segment in PREFIX.bin
    doc_index: np.ndarray  # int64[D+1] sample d = segments doc_index[d]..doc_index[d+1]
    modes: np.ndarray  # int8[S]


@dataclass(frozen=True)
class ImageIndex:
    """PREFIX.img.idx as arrays: M images, D samples."""

    offsets: np.ndarray  # uint64[M] byte offset in PREFIX.img.bin
    sizes: np.ndarray  # uint64[M]
    doc_image_start: np.ndarray  # uint64[D+1] sample d owns images doc_image_start[d]..[d+1]
    widths: np.ndarray  # uint32[M]
    heights: np.ndarray  # uint32[M]
    crc32: np.ndarray  # uint32[M]
    doc_source: np.ndarray  # uint32[D] source-file id of each sample
    formats: np.ndarray  # uint8[M]


def read_token_index(path: str) -> TokenIndex:
    """Map PREFIX.idx; checks the header and that the file is a multimodal int32 index."""
    raw = _map(path, np.uint8)
    if raw.size < TOKEN_INDEX_HEADER_BYTES or bytes(raw[:9]) != TOKEN_INDEX_MAGIC:
        raise ValueError(f"{path}: not an MMIDIDX index")
    (version,) = raw[9:17].view(np.uint64)
    if version != TOKEN_INDEX_VERSION or raw[17] != TOKEN_DTYPE_CODE:
        raise ValueError(
            f"{path}: need MMIDIDX version 1 with int32 tokens, got version {version} dtype {raw[17]}"
        )
    num_segments, doc_index_length = (int(v) for v in raw[18:34].view(np.uint64))
    expected = TOKEN_INDEX_HEADER_BYTES + num_segments * (4 + 8 + 1) + doc_index_length * 8
    if raw.size != expected or doc_index_length < 1:
        raise ValueError(f"{path}: {raw.size} bytes, expected {expected} for a multimodal index")
    at = TOKEN_INDEX_HEADER_BYTES

    def take(dtype, count):
        nonlocal at
        nbytes = count * np.dtype(dtype).itemsize
        array = raw[at : at + nbytes].view(dtype)
        at += nbytes
        return array

    lengths = take(np.int32, num_segments)
    pointers = take(np.int64, num_segments)
    doc_index = take(np.int64, doc_index_length)
    modes = take(np.int8, num_segments)
    return TokenIndex(lengths, pointers, doc_index, modes)


def read_image_index(path: str) -> ImageIndex:
    """Map PREFIX.img.idx; checks magic, version and the exact file size."""
    raw = _map(path, np.uint8)
    if raw.size < IMAGE_INDEX_HEADER_BYTES or bytes(raw[:8]) != IMAGE_INDEX_MAGIC:
        raise ValueError(f"{path}: not an MSIMGIDX image index")
    version, num_images, num_docs = (int(v) for v in raw[8:32].view(np.uint64))
    if version != IMAGE_INDEX_VERSION:
        raise ValueError(f"{path}: unsupported MSIMGIDX version {version}")
    layout = [
        ("offsets", np.uint64, num_images),
        ("sizes", np.uint64, num_images),
        ("doc_image_start", np.uint64, num_docs + 1),
        ("widths", np.uint32, num_images),
        ("heights", np.uint32, num_images),
        ("crc32", np.uint32, num_images),
        ("doc_source", np.uint32, num_docs),
        ("formats", np.uint8, num_images),
    ]
    expected = IMAGE_INDEX_HEADER_BYTES + sum(padded_to_8(n * np.dtype(t).itemsize) for _, t, n in layout)
    if raw.size != expected:
        raise ValueError(f"{path}: {raw.size} bytes, expected {expected}")
    arrays, at = {}, IMAGE_INDEX_HEADER_BYTES
    for name, dtype, count in layout:
        nbytes = count * np.dtype(dtype).itemsize
        arrays[name] = raw[at : at + nbytes].view(dtype)
        at += padded_to_8(nbytes)
    return ImageIndex(**arrays)


@dataclass(frozen=True)
class ImageRef:
    """One stored image: its encoded bytes (zero-copy view of PREFIX.img.bin) and header facts."""

    data: memoryview
    width: int
    height: int
    format: int  # IMAGE_FORMAT_JPEG / _PNG / _OTHER
    crc32: int


@dataclass(frozen=True)
class MultimodalSample:
    """Sample `index` as stored: segments (modes and tokens; an IMAGE segment holds its image ordinal)."""

    index: int
    source: int  # source-file id given to the writer
    segment_modes: np.ndarray  # int8[S]
    segment_tokens: list[np.ndarray]  # S int32 arrays
    images: list[ImageRef]


@dataclass(frozen=True)
class TokenizedSample:
    """A sample ready for packing: image slots expanded to <img> + 256*tiles <IMG_CONTEXT> + </img>."""

    input_ids: np.ndarray  # int32[T]
    loss_mask: np.ndarray  # bool[T], True on TARGET tokens only
    image_tiles: list[int]  # tiles of each image in ordinal order (what the decoder must produce)


class IndexedMultimodalDataset:
    """Random access to the samples of one prefix.

    Args:
        prefix: path without extension (PREFIX.bin, PREFIX.idx, PREFIX.img.bin, PREFIX.img.idx).
        allow_missing_manifest: open a prefix without PREFIX.manifest.json (a shard that a merge
            will consume). Otherwise a missing manifest means preprocessing did not finish and
            opening raises IncompleteDatasetError.
        verify: check each image's crc32 whenever a sample is read.
    """

    def __init__(self, prefix: str | os.PathLike, allow_missing_manifest: bool = False, verify: bool = False):
        self.prefix = os.fspath(prefix)
        self.verify = verify
        self.allow_missing_manifest = allow_missing_manifest
        missing = [p for p in data_paths(self.prefix) if not os.path.exists(p)]
        if missing:
            raise IncompleteDatasetError(f"dataset prefix {self.prefix!r} is missing {', '.join(missing)}")
        self.manifest: dict | None = None
        if os.path.exists(manifest_path(self.prefix)):
            with open(manifest_path(self.prefix), encoding="utf-8") as f:
                self.manifest = json.load(f)
        elif not allow_missing_manifest:
            raise IncompleteDatasetError(
                f"{manifest_path(self.prefix)} not found: preprocessing of {self.prefix!r} did not finish "
                "(the manifest is written last). Re-run or resume it; pass allow_missing_manifest=True "
                "only to read a shard before its merge."
            )
        self._tokens = _map(token_bin_path(self.prefix), np.int32)
        self._token_index = read_token_index(token_idx_path(self.prefix))
        self._image_bytes = _map(image_bin_path(self.prefix), np.uint8)
        self._image_index = read_image_index(image_idx_path(self.prefix))
        self._check_sizes()
        self._text_counts: np.ndarray | None = None

    def __getstate__(self) -> dict:
        # pickle the prefix, not the mapped arrays: a spawned DataLoader worker maps the files itself
        return {
            "prefix": self.prefix,
            "allow_missing_manifest": self.allow_missing_manifest,
            "verify": self.verify,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _check_sizes(self) -> None:
        ti, ii = self._token_index, self._image_index
        if len(ti.doc_index) - 1 != len(ii.doc_source):
            raise ValueError(
                f"{self.prefix}: {len(ti.doc_index) - 1} samples in .idx but {len(ii.doc_source)} in .img.idx"
            )
        num_tokens = int(ti.pointers[-1]) // 4 + int(ti.lengths[-1]) if len(ti.lengths) else 0
        if num_tokens != self._tokens.size:
            raise ValueError(
                f"{self.prefix}.bin holds {self._tokens.size} tokens, its index describes {num_tokens}"
            )
        image_bytes = int(ii.offsets[-1] + ii.sizes[-1]) if len(ii.sizes) else 0
        if image_bytes != self._image_bytes.size:
            raise ValueError(
                f"{self.prefix}.img.bin holds {self._image_bytes.size} bytes, its index describes {image_bytes}"
            )

    def __len__(self) -> int:
        return len(self._token_index.doc_index) - 1

    @property
    def num_images(self) -> int:
        return len(self._image_index.sizes)

    @property
    def num_tokens(self) -> int:
        """Stored tokens (an image slot counts one)."""
        return int(self._tokens.size)

    @property
    def sources(self) -> np.ndarray:
        """uint32[N] source-file id of every sample."""
        return self._image_index.doc_source

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {self.prefix!r} with {n} samples")
        return int(i) % n

    def __getitem__(self, i: int) -> MultimodalSample:
        return self.sample(i)

    def sample(self, i: int, verify: bool | None = None) -> MultimodalSample:
        """Sample i with its segments and images; verify (default: the dataset's flag) checks crc32."""
        i = self._check_index(i)
        ti = self._token_index
        first, last = int(ti.doc_index[i]), int(ti.doc_index[i + 1])
        lengths = ti.lengths[first:last]
        start = int(ti.pointers[first]) // 4 if last > first else 0
        tokens = self._tokens[start : start + int(lengths.sum())]
        segments = np.split(tokens, np.cumsum(lengths[:-1])) if last > first else []
        images = [self._image_ref(m, i, verify) for m in self._image_range(i)]
        return MultimodalSample(
            i, int(self._image_index.doc_source[i]), ti.modes[first:last], segments, images
        )

    def _image_range(self, i: int) -> range:
        starts = self._image_index.doc_image_start
        return range(int(starts[i]), int(starts[i + 1]))

    def _image_ref(self, m: int, sample: int, verify: bool | None) -> ImageRef:
        ii = self._image_index
        offset, size = int(ii.offsets[m]), int(ii.sizes[m])
        data = memoryview(self._image_bytes[offset : offset + size])
        crc = int(ii.crc32[m])
        if (self.verify if verify is None else verify) and zlib.crc32(data) != crc:
            raise ValueError(
                f"{self.prefix}: sample {sample}, image {m - self._image_range(sample).start}: "
                f"crc32 mismatch (stored {crc:#010x}, data {zlib.crc32(data):#010x})"
            )
        return ImageRef(data, int(ii.widths[m]), int(ii.heights[m]), int(ii.formats[m]), crc)

    def image_sizes(self, i: int) -> list[tuple[int, int]]:
        """(width, height) of each image of sample i, in ordinal order."""
        r = self._image_range(self._check_index(i))
        ii = self._image_index
        return list(
            zip(ii.widths[r.start : r.stop].tolist(), ii.heights[r.start : r.stop].tolist(), strict=True)
        )

    def text_token_counts(self) -> np.ndarray:
        """int64[N] PROMPT + TARGET tokens of every sample (image slots excluded)."""
        if self._text_counts is None:
            ti = self._token_index
            text = np.where(ti.modes != SEGMENT_IMAGE, ti.lengths, 0).astype(np.int64)
            cumulative = np.concatenate([[0], np.cumsum(text)])
            self._text_counts = cumulative[ti.doc_index[1:]] - cumulative[ti.doc_index[:-1]]
        return self._text_counts

    def token_counts(
        self, max_tiles: int, min_tiles: int = 1, tile_size: int = TILE_SIZE, use_thumbnail: bool = True
    ) -> np.ndarray:
        """int64[N] tokens of every sample after expansion: text + num_image_tokens of each image.

        Each distinct (width, height) is tiled once, so the cost is O(images) numpy work plus one
        Python call per distinct size.
        """
        ii = self._image_index
        sizes = (ii.widths.astype(np.uint64) << np.uint64(32)) | ii.heights.astype(np.uint64)
        unique_sizes, which = np.unique(sizes, return_inverse=True)
        per_size = np.array(
            [
                num_image_tokens(
                    int(s >> 32), int(s & 0xFFFFFFFF), max_tiles, min_tiles, tile_size, use_thumbnail
                )
                for s in unique_sizes.tolist()
            ],
            dtype=np.int64,
        )
        per_image = per_size[which.reshape(-1)] if len(which) else np.zeros(0, dtype=np.int64)
        cumulative = np.concatenate([[0], np.cumsum(per_image)])
        starts = ii.doc_image_start.astype(np.int64)
        return self.text_token_counts() + cumulative[starts[1:]] - cumulative[starts[:-1]]

    def _image_token_ids(self, img_start_id, img_context_id, img_end_id) -> tuple[int, int, int]:
        ids = (self.manifest or {}).get("image_token_ids", {})
        resolved = (
            img_start_id if img_start_id is not None else ids.get("img_start"),
            img_context_id if img_context_id is not None else ids.get("img_context"),
            img_end_id if img_end_id is not None else ids.get("img_end"),
        )
        if None in resolved:
            raise ValueError(
                f"{self.prefix}: image token ids not given and not in the manifest's image_token_ids"
            )
        return tuple(int(x) for x in resolved)

    def expand(
        self,
        i: int,
        max_tiles: int,
        img_start_id: int | None = None,
        img_context_id: int | None = None,
        img_end_id: int | None = None,
        min_tiles: int = 1,
        tile_size: int = TILE_SIZE,
        use_thumbnail: bool = True,
    ) -> TokenizedSample:
        """Sample i as model input: each IMAGE slot k becomes <img> + 256*tiles_k <IMG_CONTEXT> + </img>.

        The ids default to manifest["image_token_ids"]; loss_mask is True on TARGET tokens only.
        """
        start_id, context_id, end_id = self._image_token_ids(img_start_id, img_context_id, img_end_id)
        sample = self.sample(i, verify=False)
        tiles = [
            num_tiles(w, h, max_tiles, min_tiles, tile_size, use_thumbnail) for w, h in self.image_sizes(i)
        ]
        ids, mask = [], []
        for mode, tokens in zip(sample.segment_modes.tolist(), sample.segment_tokens, strict=True):
            if mode == SEGMENT_IMAGE:
                context = np.full(TOKENS_PER_TILE * tiles[int(tokens[0])], context_id, dtype=np.int32)
                ids += [np.array([start_id], np.int32), context, np.array([end_id], np.int32)]
                mask.append(np.zeros(len(context) + 2, dtype=bool))
            else:
                ids.append(tokens)
                mask.append(np.full(len(tokens), mode == SEGMENT_TARGET, dtype=bool))
        input_ids = np.concatenate(ids).astype(np.int32, copy=False) if ids else np.zeros(0, np.int32)
        loss_mask = np.concatenate(mask) if mask else np.zeros(0, bool)
        return TokenizedSample(input_ids, loss_mask, tiles)

    def verify_all(self) -> None:
        """Check every image's crc32; raises ValueError naming the first bad sample and image."""
        for i in range(len(self)):
            for m in self._image_range(i):
                self._image_ref(m, i, verify=True)
