"""Encoded images -> InternVL tiles: decode, dynamic tiling, ImageNet normalisation.

`decode_tiles` turns a batch of encoded images into one float32 [n, 3, T, T] tensor per image (the
grid's tiles row by row, then a thumbnail when the grid has more than one tile). Backends pil, dali
and auto, the GPU/CPU routing and the bad-image policy: docs/loader.md ("Image decoding").
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from megasail.data.compat import cuda_is_in_bad_fork
from megasail.data.images import dali
from megasail.data.images.formats import DEFAULT_MAX_IMAGE_PIXELS, PIL_FORMATS
from megasail.data.images.tiling import TILE_SIZE, tile_grid

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "pil", "dali")
BACKEND_ENV_VAR = "MEGASAIL_DECODE_BACKEND"
# DEFAULT_MAX_IMAGE_PIXELS decides whatever PIL's global MAX_IMAGE_PIXELS is; PIL's Image.open still
# refuses headers above 2x that global (179 MP by default), so a larger limit needs that raised too.
# auto on CPU: per format, the size (pixels) from which DALI's CPU pipeline beats PIL per core
# (tools/bench_images.py --sweep-sizes); formats not listed always go to PIL.
AUTO_DALI_MIN_PIXELS = {"JPEG": 6_000_000}
IMAGENET_MEAN = dali.IMAGENET_MEAN
IMAGENET_STD = dali.IMAGENET_STD

# v/255 normalised as (v/255 - mean)/std, folded into one multiply-add per pixel.
_SCALE_C11 = torch.tensor([1.0 / (255.0 * s) for s in IMAGENET_STD], dtype=torch.float32).view(3, 1, 1)
_SHIFT_C11 = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)],
                          dtype=torch.float32).view(3, 1, 1)


class ImageDecodeError(ValueError):
    """An image that cannot be decoded. `kind` is "corrupt" or "too_large"."""

    def __init__(self, index: int, kind: str, reason: str):
        super().__init__(f"image {index}: {kind}: {reason}")
        self.index = index
        self.kind = kind
        self.reason = reason


@dataclass
class DecodeStats:
    """Counters over the `decode_tiles` calls it is passed to."""

    decoded: int = 0  # images turned into tiles
    tiles: int = 0  # tiles emitted, thumbnails included
    corrupt: int = 0  # refused: not an image, truncated, or failed to decode
    too_large: int = 0  # refused from the header: more pixels than max_image_pixels
    backend_counts: Counter = field(default_factory=Counter)  # decoded images per "pil"/"dali_cpu"/"dali_mixed"


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    format: str  # PIL's name: "JPEG", "PNG", ...


def read_header(data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageHeader:
    """Size and format from the header alone; raises ImageDecodeError (index -1) for refused images."""
    try:
        with warnings.catch_warnings():
            # Our own limit below decides; PIL's warning for > Image.MAX_IMAGE_PIXELS is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # parses the header, decodes no pixels; only the formats datasets hold (no EPS/PSD/... parsers)
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as image:
                width, height, fmt = image.width, image.height, image.format or ""
    except Image.DecompressionBombError as error:  # PIL's own ceiling, 2x Image.MAX_IMAGE_PIXELS, cannot be skipped
        raise ImageDecodeError(-1, "too_large", f"PIL refused the header: {error}") from error
    except Exception as error:  # noqa: BLE001 - any parser failure means "not a readable image"
        raise ImageDecodeError(-1, "corrupt", f"unreadable header ({type(error).__name__}: {error})") from error
    if width <= 0 or height <= 0:
        raise ImageDecodeError(-1, "corrupt", f"empty image {width}x{height}")
    if width * height > max_image_pixels:
        raise ImageDecodeError(-1, "too_large",
                               f"{width}x{height} = {width * height} pixels > max_image_pixels={max_image_pixels}")
    return ImageHeader(width, height, fmt)


def normalized_tiles_from_uint8(grid_hwc: np.ndarray, cols: int, rows: int, tile_size: int,
                                thumbnail_hwc: np.ndarray | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [rows*T, cols*T, 3] grid (+ [T, T, 3] thumbnail) -> float32 [n(+1), 3, T, T], normalised.

    Written into `out` (float32 of that shape, e.g. a slice of a batch tensor) when given.
    """
    n = cols * rows
    tiles_u8 = torch.empty((n + (thumbnail_hwc is not None), 3, tile_size, tile_size), dtype=torch.uint8)
    # Rearrange as uint8 (a quarter of the float bytes): tile (r, c) = grid[r*T:(r+1)*T, c*T:(c+1)*T].
    tiles_u8[:n].view(rows, cols, 3, tile_size, tile_size).copy_(
        torch.from_numpy(grid_hwc).view(rows, tile_size, cols, tile_size, 3).permute(0, 2, 4, 1, 3))
    if thumbnail_hwc is not None:
        tiles_u8[n].copy_(torch.from_numpy(thumbnail_hwc).permute(2, 0, 1))
    if out is None:
        out = torch.empty(tiles_u8.shape, dtype=torch.float32)
    return out.copy_(tiles_u8).mul_(_SCALE_C11).add_(_SHIFT_C11)


def decode_tiles_pil(data: bytes, cols: int, rows: int, tile_size: int = TILE_SIZE,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """One image with PIL, exactly as InternVL's load_image: float32 [cols*rows (+1), 3, T, T].

    Written into `out` (a CPU float32 tensor of that shape) when given; `out` is untouched when
    the image fails to decode.

    Raises OSError / ValueError (from PIL) when the pixel data is corrupt.
    """
    with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as image:
        image.load()  # decodes: truncated or corrupt pixel data raises here
        # Palette, grey, alpha and CMYK become RGB as in InternVL (an RGB image needs no copy).
        image = image if image.mode == "RGB" else image.convert("RGB")
    grid = image.resize((cols * tile_size, rows * tile_size), Image.BICUBIC)
    thumbnail = image.resize((tile_size, tile_size), Image.BICUBIC) if cols * rows > 1 else None
    return normalized_tiles_from_uint8(np.array(grid), cols, rows, tile_size,
                                       None if thumbnail is None else np.array(thumbnail), out)


_logged: set[str] = set()
_tilers: dict[tuple[int, int | None, int], dali.DaliTiler] = {}


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


_worker_gpu: int | None = None  # set in a spawned loader worker that may decode on this GPU


def enable_gpu_decode_in_worker(device_id: int) -> None:
    """Let this DataLoader worker (spawned or forkserver-started, never forked) decode with DALI
    `mixed` on `device_id`; called from the loader's worker_init_fn."""
    global _worker_gpu
    if cuda_is_in_bad_fork():
        raise RuntimeError("a forked worker of a CUDA process cannot decode on the GPU; start workers with spawn")
    torch.cuda.set_device(device_id)
    _worker_gpu = device_id


def _gpu_decode_allowed() -> bool:
    """DALI `mixed` decoding only in a process that owns its GPU: the main process, or a loader
    worker started with spawn/forkserver (`enable_gpu_decode_in_worker`); a forked worker cannot
    re-initialise the CUDA context its parent already holds."""
    if torch.utils.data.get_worker_info() is not None and _worker_gpu is None:
        return False
    return dali.dali_gpu_count() > 0


def _dali_tiler(num_threads: int) -> dali.DaliTiler:
    """The process's DaliTiler: on GPU 'mixed' when DALI sees one, else the CPU pipeline."""
    device_id = torch.cuda.current_device() if _gpu_decode_allowed() else None
    key = (os.getpid(), device_id, num_threads)  # a forked DataLoader worker must not reuse its parent's threads
    if key not in _tilers:
        _tilers[key] = dali.DaliTiler(device_id=device_id, num_threads=num_threads)
    return _tilers[key]


def _decode_with_dali(backend: str, header: ImageHeader, on_gpu: bool) -> bool:
    """Routing of one image; formats DALI cannot read always go to PIL."""
    if header.format not in dali.DALI_FORMATS or backend == "pil":
        return False
    # auto on CPU: DALI's per-image overhead loses on small images, its decode wins on large ones.
    min_pixels = AUTO_DALI_MIN_PIXELS.get(header.format)
    return backend == "dali" or on_gpu or (min_pixels is not None and header.width * header.height >= min_pixels)


def _dali_reason(error: Exception) -> str:
    """The line after "encountered:" in DALI's multi-line pipeline error (the decoder's own words)."""
    lines = [line.strip() for line in str(error).splitlines()]
    if "encountered:" in lines:
        following = [line for line in lines[lines.index("encountered:") + 1:] if line]
        if following:
            return following[0]
    return lines[0] if lines else type(error).__name__


def resolve_backend(backend: str) -> str:
    """The backend a call uses: the argument, or MEGASAIL_DECODE_BACKEND when the argument is "auto"."""
    if backend == "auto":
        backend = os.environ.get(BACKEND_ENV_VAR, "") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"unknown image decode backend {backend!r} (from the argument or ${BACKEND_ENV_VAR}); "
                         f"choose one of {', '.join(BACKENDS)}")
    if backend in ("dali", "auto") and not dali.dali_available():
        if backend == "dali":
            dali.DaliTiler()  # raises the install hint
        backend = "pil"
    return backend


def output_device(backend: str = "auto", dali_threads: int = 1) -> str:
    """Where `decode_tiles` puts its tensors for this backend: "cpu", or the GPU of DALI `mixed`."""
    backend = resolve_backend(backend)
    on_gpu = backend != "pil" and _gpu_decode_allowed()
    return _dali_tiler(dali_threads).device if on_gpu else "cpu"


def _out_slots(out: torch.Tensor, out_tiles: Sequence[int] | None, grids: dict[int, _Grid],
               count: int, tile_size: int) -> list[torch.Tensor]:
    """The slice of `out` each image is written into (images back to back, in order)."""
    shape = (3, tile_size, tile_size)
    if out.dtype != torch.float32 or out.dim() != 4 or tuple(out.shape[1:]) != shape:
        raise ValueError(f"out must be float32 [tiles, {', '.join(map(str, shape))}], "
                         f"got {out.dtype} {list(out.shape)}")
    counts = []
    for index in range(count):
        if out_tiles is not None:  # a header that disagrees is already a bad image
            counts.append(int(out_tiles[index]))
        elif index in grids:
            cols, rows = grids[index].cols, grids[index].rows
            counts.append(cols * rows + (cols * rows > 1))
        else:
            raise ValueError(f"image {index}: unreadable header, so its slice of `out` is unknown; pass out_tiles")
    if sum(counts) != out.shape[0]:
        raise ValueError(f"the images have {sum(counts)} tiles, out holds {out.shape[0]}")
    slots, at = [], 0
    for n in counts:
        slots.append(out[at : at + n])
        at += n
    return slots


def decode_tiles(images: Sequence[bytes], max_tiles: int, *, backend: str = "auto", tile_size: int = TILE_SIZE,
                 min_tiles: int = 1, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, on_error: str = "skip",
                 stats: DecodeStats | None = None, dali_threads: int = 1, out: torch.Tensor | None = None,
                 out_tiles: Sequence[int] | None = None) -> list[torch.Tensor | None]:
    """Decode and tile a batch of encoded images.

    Args:
        images: encoded bytes (JPEG, PNG, BMP, TIFF, WebP, GIF, ...), one per image.
        max_tiles, min_tiles, tile_size: InternVL's dynamic tiling (`tiling.tile_grid`).
        backend: "auto", "pil" or "dali" (see the module docstring).
        max_image_pixels: images whose header declares more pixels are refused undecoded.
        on_error: "skip" puts None in a bad image's slot; "raise" raises ImageDecodeError for the
            lowest bad index after the batch is processed (stats still count every image).
        stats: counters to update (decoded, tiles, corrupt, too_large, backend_counts).
        dali_threads: worker threads of the DALI CPU pipeline.
        out: a preallocated float32 [total_tiles, 3, tile_size, tile_size] tensor (e.g. a batch's
            pixel_values in shared memory): image i is written straight into its slice, the images'
            slices back to back in order, with no per-image tensor copied afterwards. A bad image's
            slice is left as it was, for the caller to fill or discard.
        out_tiles: the tile count of each image (e.g. from the dataset index), which lays out `out`
            even when a header is unreadable. Without it the layout comes from the headers, so
            every header must be readable (ValueError otherwise). An image whose header gives
            another tile count than out_tiles is a bad image ("corrupt"); a layout whose total
            differs from out's first dimension is a ValueError.

    Returns:
        One float32 tensor [n, 3, tile_size, tile_size] per image (None for refused images with
        on_error="skip"), n = tiling.num_tiles(width, height, max_tiles, min_tiles, tile_size).
        Tensors are on the GPU when DALI `mixed` decoded the batch, else on the CPU. With `out`,
        they are the views of `out` the images were written into.
    """
    _check_arguments(images, on_error, out, out_tiles)
    stats = stats if stats is not None else DecodeStats()
    backend = resolve_backend(backend)
    results: list[torch.Tensor | None] = [None] * len(images)
    errors: dict[int, ImageDecodeError] = {}
    on_gpu = backend != "pil" and _gpu_decode_allowed()
    grids = _tile_grids(images, (max_tiles, min_tiles, tile_size), max_image_pixels, out_tiles, errors)
    use_dali = [i for i, grid in grids.items() if _decode_with_dali(backend, grid.header, on_gpu)]
    slots = _out_slots(out, out_tiles, grids, len(images), tile_size) if out is not None else None
    _log_backend(backend, on_gpu)
    device = _dali_tiler(dali_threads).device if on_gpu else "cpu"  # one device for the whole batch
    if use_dali:
        _decode_on_dali(images, use_dali, grids, tile_size, slots, dali_threads, results, errors, stats)
    dali_set = set(use_dali)
    for index, grid in grids.items():
        if index in dali_set:
            continue
        # With a CPU `out`, PIL writes into its slice; else (no out, or out on the GPU) it is moved there.
        direct = slots is not None and slots[index].device.type == "cpu"
        try:
            tiles = decode_tiles_pil(bytes(images[index]), grid.cols, grid.rows, tile_size,
                                     out=slots[index] if direct else None)
        except Exception as error:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError... on bad data
            errors[index] = ImageDecodeError(index, "corrupt", f"{type(error).__name__}: {error}")
            continue
        if slots is not None and not direct:
            tiles = slots[index].copy_(tiles)
        results[index] = tiles if slots is not None else tiles.to(device)
        stats.backend_counts["pil"] += 1
    _count(stats, results, errors)
    if errors and on_error == "raise":
        raise errors[min(errors)]
    return results


def _check_arguments(images: Sequence[bytes], on_error: str, out: torch.Tensor | None,
                     out_tiles: Sequence[int] | None) -> None:
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if out_tiles is not None and out is None:
        raise ValueError("out_tiles lays out `out`; pass out as well")
    if out_tiles is not None and len(out_tiles) != len(images):
        raise ValueError(f"out_tiles has {len(out_tiles)} counts for {len(images)} images")


@dataclass(frozen=True)
class _Grid:
    """An image's header and the tile grid it gets."""

    header: ImageHeader
    cols: int
    rows: int


def _tile_grids(images: Sequence[bytes], tiling: tuple[int, int, int], max_image_pixels: int,
                out_tiles: Sequence[int] | None, errors: dict[int, ImageDecodeError]) -> dict[int, _Grid]:
    """The tile grid of every image whose header is readable, allowed and agrees with out_tiles (by
    index); the others go into `errors`. tiling = (max_tiles, min_tiles, tile_size)."""
    grids = {}
    for index, data in enumerate(images):
        try:
            header = read_header(bytes(data), max_image_pixels)
        except ImageDecodeError as error:
            errors[index] = ImageDecodeError(index, error.kind, error.reason)
            continue
        cols, rows = tile_grid(header.width, header.height, *tiling)
        tiles = cols * rows + (cols * rows > 1)
        if out_tiles is not None and tiles != int(out_tiles[index]):
            errors[index] = ImageDecodeError(index, "corrupt", f"its {header.width}x{header.height} header gives "
                                             f"{tiles} tiles, out_tiles says {out_tiles[index]}")
            continue
        grids[index] = _Grid(header, cols, rows)
    return grids


def _log_backend(backend: str, on_gpu: bool) -> None:
    if backend == "auto":
        _log_once("image decode backend: auto -> DALI mixed (GPU)" if on_gpu else
                  f"image decode backend: auto -> per image on CPU: DALI CPU from {AUTO_DALI_MIN_PIXELS} pixels, "
                  "else PIL")
    else:
        _log_once(f"image decode backend: {backend}" + (" (DALI mixed, GPU)" if on_gpu else ""))


def _decode_on_dali(images: Sequence[bytes], indices: list[int], grids: dict[int, _Grid], tile_size: int,
                    slots: list[torch.Tensor] | None, dali_threads: int, results: list, errors: dict,
                    stats: DecodeStats) -> None:
    """Decode images[indices] in one DALI batch into `results` (failures into `errors`)."""
    tiler = _dali_tiler(dali_threads)
    dali_name = "dali_cpu" if tiler.device_id is None else "dali_mixed"
    decoded = tiler.decode_each([bytes(images[i]) for i in indices], [(grids[i].cols, grids[i].rows) for i in indices],
                                tile_size, outs=None if slots is None else [slots[i] for i in indices])
    for index, tiles in zip(indices, decoded, strict=True):
        if isinstance(tiles, Exception):
            errors[index] = ImageDecodeError(index, "corrupt", f"DALI could not decode it: {_dali_reason(tiles)}")
        else:
            results[index] = tiles
            stats.backend_counts[dali_name] += 1


def _count(stats: DecodeStats, results: list, errors: dict[int, ImageDecodeError]) -> None:
    for tiles in results:
        if tiles is not None:
            stats.decoded += 1
            stats.tiles += tiles.shape[0]
    for error in errors.values():
        if error.kind == "too_large":
            stats.too_large += 1
        else:
            stats.corrupt += 1
