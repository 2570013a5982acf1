"""DALI backend of `decode`: one pipeline decodes, resizes to the tile grid, thumbnails and normalises.

`mixed` (nvJPEG + GPU) where DALI sees a GPU this process may use, else a CPU pipeline. DALI is
optional: `DaliTiler` raises a clear error when it is not installed. Design: docs/loader.md.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import backend as dali_backend
    from nvidia.dali.pipeline import Pipeline
except ImportError:  # DALI is an optional extra: megasail[dali]
    fn = None

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Formats DALI's image decoder reads (PIL names); others (GIF, ICO, ...) go to the PIL backend.
DALI_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "WEBP", "JPEG2000", "PPM"})
_MAX_CACHED_PIPELINES = 8  # each pipeline holds worker threads and buffers


def dali_available() -> bool:
    """True when nvidia-dali is importable."""
    return fn is not None


def dali_gpu_count() -> int:
    """CUDA devices both torch and DALI can use (0 on CPU-only machines)."""
    if fn is None or not torch.cuda.is_available():
        return 0
    try:
        return int(dali_backend.GetCUDADeviceCount())
    except RuntimeError:  # DALI found no usable driver
        return 0


@dataclass(frozen=True)
class PipelineKey:
    """What a cached pipeline is specialised for; grid sizes are fed per sample, not baked in."""

    max_batch_size: int  # rounded up to a power of two so varying batch sizes share pipelines
    tile_size: int
    with_thumbnail: bool
    device_id: int | None  # None: CPU pipeline; an int: `mixed` decode on that GPU
    num_threads: int


def _build_pipeline(key: PipelineKey) -> Pipeline:
    """Inputs "encoded" (uint8 [bytes]) and "grid_hw" (float32 [2]); outputs float32 CHW grid (+ thumbnail)."""
    on_gpu = key.device_id is not None
    mean = [255.0 * m for m in IMAGENET_MEAN]  # decoded pixels are 0..255
    std = [255.0 * s for s in IMAGENET_STD]
    pipe = Pipeline(
        batch_size=key.max_batch_size,
        num_threads=key.num_threads,
        device_id=key.device_id,
        # One batch is fed and run at once (a deeper queue waits for more batches). Keep the default
        # executor: with exec_async/exec_pipelined off, one failed batch invalidates the pipeline.
        prefetch_queue_depth=1,
    )
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, device="cpu")
        grid_hw = fn.external_source(name="grid_hw", dtype=types.FLOAT, ndim=1, device="cpu")
        # adjust_orientation=False: InternVL (PIL Image.open) ignores EXIF orientation.
        # jpeg_fancy_upsampling: nvJPEG chroma upsampling like libjpeg-turbo (and PIL).
        decoded = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                    adjust_orientation=False,
                                    **({"jpeg_fancy_upsampling": True} if on_gpu else {}))
        # Antialias keeps DALI's cubic within ~0.2/255 of PIL's BICUBIC on large downscales.
        grid = fn.resize(decoded, size=grid_hw, interp_type=types.INTERP_CUBIC, antialias=True)
        outputs = [fn.crop_mirror_normalize(grid, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")]
        if key.with_thumbnail:
            thumb = fn.resize(decoded, size=[key.tile_size, key.tile_size], interp_type=types.INTERP_CUBIC,
                              antialias=True)
            outputs.append(fn.crop_mirror_normalize(thumb, mean=mean, std=std, dtype=types.FLOAT,
                                                    output_layout="CHW"))
        pipe.set_outputs(*outputs)
    pipe.build()
    return pipe


def grid_to_tiles(grid_chw: torch.Tensor, cols: int, rows: int, tile_size: int,
                  thumbnail_chw: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """[3, rows*T, cols*T] grid (+ [3, T, T] thumbnail) -> [rows*cols (+1), 3, T, T], tiles row by row.

    Written into `out` (that shape, any device) when given, else into a new tensor on the grid's device.
    """
    n = cols * rows
    if out is None:
        out = torch.empty((n + (thumbnail_chw is not None), 3, tile_size, tile_size), dtype=grid_chw.dtype,
                          device=grid_chw.device)
    # One copy: tile (r, c) is grid[:, r*T:(r+1)*T, c*T:(c+1)*T].
    out[:n].view(rows, cols, 3, tile_size, tile_size).copy_(
        grid_chw.view(3, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4))
    if thumbnail_chw is not None:
        out[n].copy_(thumbnail_chw)
    return out


class DaliTiler:
    """Decodes batches with lazily built DALI pipelines, cached per `PipelineKey`.

    One instance per process and thread: a DALI pipeline is fed and run by one caller at a time.

    Args:
        device_id: GPU for `mixed` decode, or None for a CPU pipeline.
        num_threads: DALI worker threads per pipeline.
    """

    def __init__(self, device_id: int | None = None, num_threads: int = 1):
        if fn is None:
            raise ImportError("backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda120 "
                              "(nvidia-dali-cuda130 on CUDA 13), or use backend='pil'")
        self.device_id = device_id
        self.num_threads = num_threads
        self._pipelines: OrderedDict[PipelineKey, Pipeline] = OrderedDict()

    @property
    def device(self) -> str:
        return "cpu" if self.device_id is None else f"cuda:{self.device_id}"

    def _pipeline(self, key: PipelineKey) -> Pipeline:
        if key in self._pipelines:
            self._pipelines.move_to_end(key)
        else:
            self._pipelines[key] = _build_pipeline(key)
            if len(self._pipelines) > _MAX_CACHED_PIPELINES:
                self._pipelines.popitem(last=False)
        return self._pipelines[key]

    def decode_batch(self, images: Sequence[bytes], grids: Sequence[tuple[int, int]],
                     tile_size: int, outs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Encoded images and their (cols, rows) grids -> one float32 [n, 3, T, T] per image.

        With `outs` (one float32 [n, 3, T, T] tensor per image), each image's tiles are written into
        its tensor, which is returned; nothing is written when the batch fails.

        Raises RuntimeError when DALI fails the batch (one undecodable image fails all of them);
        the pipeline stays usable for the next batch.
        """
        if not images:
            return []
        with_thumbnail = any(cols * rows > 1 for cols, rows in grids)
        key = PipelineKey(1 << (len(images) - 1).bit_length(), tile_size, with_thumbnail, self.device_id,
                          self.num_threads)
        pipe = self._pipeline(key)
        pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8) for data in images])
        pipe.feed_input("grid_hw", [np.array([rows * tile_size, cols * tile_size], dtype=np.float32)
                                    for cols, rows in grids])
        outputs = pipe.run()
        grid_list = outputs[0]
        thumb_list = outputs[1] if with_thumbnail else None
        results = []
        for i, (cols, rows) in enumerate(grids):
            grid = self._to_torch(grid_list[i])
            thumb = self._to_torch(thumb_list[i]) if (thumb_list is not None and cols * rows > 1) else None
            results.append(grid_to_tiles(grid, cols, rows, tile_size, thumb, None if outs is None else outs[i]))
        return results

    def decode_each(self, images: Sequence[bytes], grids: Sequence[tuple[int, int]],
                    tile_size: int, outs: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor | Exception]:
        """Like `decode_batch`, but a failed batch is re-decoded one image at a time.

        Returns the tiles of each image, or the exception that image raised (its `outs` tensor,
        if any, is then left as it was).
        """
        try:
            return list(self.decode_batch(images, grids, tile_size, outs))
        except RuntimeError as batch_error:
            if len(images) == 1:
                return [batch_error]
            logger.debug("DALI batch of %d failed (%s); retrying one image at a time", len(images), batch_error)
        results: list[torch.Tensor | Exception] = []
        for i, (data, grid) in enumerate(zip(images, grids, strict=True)):
            try:
                results.append(self.decode_batch([data], [grid], tile_size, None if outs is None else [outs[i]])[0])
            except RuntimeError as error:
                results.append(error)
        return results

    def _to_torch(self, dali_tensor) -> torch.Tensor:
        """A view of a CPU output (valid until the next run) or a copy of a GPU output."""
        if self.device_id is None:
            return torch.from_numpy(np.asarray(dali_tensor))
        from nvidia.dali.plugin.pytorch import feed_ndarray  # imports only on GPU machines

        out = torch.empty(dali_tensor.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(dali_tensor, out, cuda_stream=torch.cuda.current_stream(self.device_id))
        return out
