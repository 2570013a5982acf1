"""What a loader worker does with one micro-batch plan: read, expand, decode, replace bad samples, collate.

Also how the workers start (fork, or spawn where a GPU decodes). The bad-sample rule and the
zero-copy pixel layout: docs/loader.md ("Bad images at training time", "Batch fields").
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from megasail.child_processes import die_with_parent, ignore_stop_signals
from megasail.data.compat import new_shared_storage
from megasail.data.format.reader import IndexedMultimodalDataset, TokenizedSample
from megasail.data.images import decode
from megasail.data.loader.config import DataConfig
from megasail.data.loader.curriculum import PlannedSequence
from megasail.data.loader.packing import PackedSequence, collate_packed
from megasail.data.loader.pixel_pool import PixelBufferPool
from megasail.data.loader.state import LoaderPosition

logger = logging.getLogger(__name__)
MAX_LOGGED_PER_BATCH = 8  # bad samples named in one micro-batch's stats (all are logged)


@dataclass(frozen=True)
class MicroBatchPlan:
    """One micro-batch of one data-parallel rank: its packed sequences and where it sits."""

    sequences: tuple[PlannedSequence, ...]
    stage: int
    global_batch: int  # run-wide index of the global batch it belongs to
    micro_batch: int  # index among this rank's micro-batches of that global batch
    position_after: LoaderPosition | None  # set on the rank's last micro-batch of the global batch


@dataclass
class BuiltMicroBatch:
    """A collated batch dict, the counters of building it, and its plan."""

    batch: dict
    stats: dict
    plan: MicroBatchPlan


@dataclass
class _RowStats:
    bad_samples: int = 0
    replaced: int = 0
    not_replaced: int = 0
    logged: list = field(default_factory=list)


def worker_start_method(worker_start: str, decode_backend: str) -> str:
    """The multiprocessing start method of the loader's workers for `DataConfig.worker_start`.

    "auto" spawns where a GPU decodes (DALI `mixed` needs a CUDA context of its own, which a worker
    forked from a trainer that already holds one cannot create) and forks elsewhere (cheaper start).
    """
    if worker_start != "auto":
        if worker_start not in multiprocessing.get_all_start_methods():
            raise ValueError(f"data.worker_start={worker_start!r} is not available on this platform "
                             f"(available: {', '.join(multiprocessing.get_all_start_methods())})")
        return worker_start
    gpu_decodes = decode.resolve_backend(decode_backend) != "pil" and decode.dali.dali_gpu_count() > 0
    return "spawn" if gpu_decodes else "fork"


def init_worker(start_method: str, device_id: int | None, trainer_pid: int, from_main_thread: bool,
                worker_id: int) -> None:
    """`worker_init_fn` of the loader's DataLoader: die with the trainer, and decode on its GPU.

    Bound with functools.partial (picklable for spawn). `trainer_pid` is the process that started the
    workers and `from_main_thread` whether its main thread did (the parent-death signal follows the
    starting thread: megasail.child_processes). `device_id` is the trainer's current CUDA device,
    or None on CPU; a spawned worker decodes on it, a forked worker never touches CUDA.
    """
    del worker_id
    # A forkserver worker's parent is the fork server, which lives while any worker holds its
    # liveness pipe (each one does): the watch thread alone ends such a worker.
    direct = start_method != "forkserver"
    ignore_stop_signals()  # a SIGTERM to the whole job asks the trainer to save: the workers keep serving it
    die_with_parent(trainer_pid, death_signal=from_main_thread and direct, direct_child=direct)
    if start_method != "fork" and device_id is not None:
        decode.enable_gpu_decode_in_worker(device_id)


def shared_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor in shared memory (as torch's default_collate does in workers):
    the DataLoader then sends it to the main process without copying it."""
    numel = 1
    for n in shape:
        numel *= n
    storage = new_shared_storage(numel * torch.empty(0, dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def shared_float32(shape: tuple[int, ...]) -> torch.Tensor:
    return shared_tensor(shape, torch.float32)


class MicroBatchBuilder(torch.utils.data.Dataset):
    """Map-style dataset for torch's DataLoader: item = MicroBatchPlan -> BuiltMicroBatch.

    Datasets are opened lazily in each worker process (memory maps are not shared by pickling).
    `sources_by_stage[s][k]` is (prefix, display name) of source k of stage s.
    """

    def __init__(self, data: DataConfig, sources_by_stage: list[list[tuple[str, str]]]):
        self.data = data
        self.sources_by_stage = sources_by_stage
        self._datasets: dict[str, IndexedMultimodalDataset] = {}
        self.pixel_pool = PixelBufferPool()  # in-process batches only: workers decode into shared memory

    def __len__(self) -> int:  # plans come from the sampler; the length is never used to index
        return 0

    def dataset(self, stage: int, source: int) -> IndexedMultimodalDataset:
        prefix = self.sources_by_stage[stage][source][0]
        if prefix not in self._datasets:
            self._datasets[prefix] = IndexedMultimodalDataset(prefix)
        return self._datasets[prefix]

    def _expand(self, ds: IndexedMultimodalDataset, index: int) -> TokenizedSample:
        d = self.data
        return ds.expand(index, d.max_tiles, min_tiles=d.min_tiles, tile_size=d.tile_size)

    def _decode(self, images: list, decode_stats: decode.DecodeStats, out: torch.Tensor | None = None,
                out_tiles: list[int] | None = None) -> list:
        d = self.data
        return decode.decode_tiles(images, d.max_tiles, backend=d.decode_backend, tile_size=d.tile_size,
                                   min_tiles=d.min_tiles, max_image_pixels=d.max_image_pixels,
                                   on_error="skip", stats=decode_stats, out=out, out_tiles=out_tiles)

    def _reason(self, images: list, tiles: list) -> str:
        for data, result in zip(images, tiles, strict=True):
            if result is None:
                try:
                    decode.read_header(bytes(data), self.data.max_image_pixels)
                except decode.ImageDecodeError as error:
                    return f"{error.kind}: {error.reason}"
                return "corrupt: pixel data failed to decode"
        return "ok"

    def _note_bad(self, row: _RowStats, stage: int, source: int, index: int, reason: str) -> None:
        prefix, name = self.sources_by_stage[stage][source]
        message = f"bad image in source {name} ({prefix}) sample {index}: {reason}"
        logger.warning(message)
        row.bad_samples += 1
        if len(row.logged) < MAX_LOGGED_PER_BATCH:
            row.logged.append({"source": name, "prefix": prefix, "sample": index, "reason": reason})

    def _replacement(self, stage: int, source: int, index: int, room: int, row: _RowStats,
                     decode_stats: decode.DecodeStats):
        """(TokenizedSample, tiles) of the first next sample that fits `room` and decodes, or None."""
        ds = self.dataset(stage, source)
        for step in range(1, self.data.replacement_tries + 1):
            candidate = (index + step) % len(ds)
            if candidate == index:
                break
            sample = self._expand(ds, candidate)
            if len(sample.input_ids) > room:
                continue
            images = [im.data for im in ds.sample(candidate).images]
            tiles = self._decode(images, decode_stats) if images else []
            if any(t is None for t in tiles):
                self._note_bad(row, stage, source, candidate, self._reason(images, tiles))
                continue
            return sample, tiles
        return None

    def read_sequence(self, planned: PlannedSequence) -> tuple[list[TokenizedSample], list[list]]:
        """The expanded samples of one planned sequence and the encoded images of each."""
        samples, images_of = [], []
        for source, index, length in zip(planned.sources, planned.samples, planned.lengths, strict=True):
            ds = self.dataset(planned.stage, source)
            samples.append(self._expand(ds, index))
            if len(samples[-1].input_ids) != length:  # the plan's count comes from tiling.num_image_tokens
                raise AssertionError(f"{ds.prefix} sample {index}: expanded to {len(samples[-1].input_ids)} "
                                     f"tokens, the index counted {length}")
            images_of.append([im.data for im in ds.sample(index).images])
        return samples, images_of

    def build_sequence(self, planned: PlannedSequence, row: _RowStats, decode_stats: decode.DecodeStats,
                       read: tuple[list[TokenizedSample], list[list]] | None = None,
                       out: torch.Tensor | None = None) -> PackedSequence:
        """Read, expand and decode one planned sequence, replacing samples whose images fail.

        `read` is `read_sequence(planned)` when the caller has it already. With `out` (float32
        [tiles of the planned samples, 3, T, T]), the planned images are decoded straight into it,
        in order, and the sequence's pixels are views of it.
        """
        stage = planned.stage
        samples, images_of = read if read is not None else self.read_sequence(planned)
        flat = [im for images in images_of for im in images]
        out_tiles = [n for sample in samples for n in sample.image_tiles] if out is not None else None
        decoded = self._decode(flat, decode_stats, out, out_tiles) if flat else []
        tiles_of, at = [], 0
        for images in images_of:
            tiles_of.append(decoded[at : at + len(images)])
            at += len(images)
        bad = [j for j, tiles in enumerate(tiles_of) if any(t is None for t in tiles)]
        for j in bad:
            self._note_bad(row, stage, planned.sources[j], planned.samples[j], self._reason(images_of[j], tiles_of[j]))
        kept = [j for j in range(len(samples)) if j not in bad]
        used = sum(len(samples[j].input_ids) for j in kept)
        final: list[tuple[TokenizedSample, list]] = []
        for j in range(len(samples)):
            if j not in bad:
                final.append((samples[j], tiles_of[j]))
                continue
            found = self._replacement(stage, planned.sources[j], planned.samples[j],
                                      self.data.seq_length - used, row, decode_stats)
            if found is None:
                row.not_replaced += 1
                continue
            row.replaced += 1
            used += len(found[0].input_ids)
            final.append(found)
        return PackedSequence([s for s, _ in final], [t for _, tiles in final for t in tiles])

    def __getitem__(self, plan: MicroBatchPlan) -> BuiltMicroBatch:
        started = time.perf_counter()
        row, decode_stats = _RowStats(), decode.DecodeStats()
        in_worker = torch.utils.data.get_worker_info() is not None
        reads = [self.read_sequence(p) for p in plan.sequences]
        # The planned tiles, known from the index: one tensor for the micro-batch, each sequence its slice.
        tiles_of = [sum(sum(s.image_tiles) for s in samples) for samples, _ in reads]
        size = self.data.tile_size
        pixels = None
        device = decode.output_device(self.data.decode_backend)
        if sum(tiles_of) and device == "cpu":  # DALI mixed (GPU) decodes to the GPU: concatenated there
            shape = (sum(tiles_of), 3, size, size)
            pixels = shared_float32(shape) if in_worker else self.pixel_pool.take(shape)
        sequences, at = [], 0
        for planned, read, n in zip(plan.sequences, reads, tiles_of, strict=True):
            out = pixels[at : at + n] if pixels is not None and n else None
            sequences.append(self.build_sequence(planned, row, decode_stats, read, out))
            at += n
        # A dropped sample (replaced or not) changes the layout: then the tiles are concatenated anew.
        intact = row.bad_samples == 0
        context_id = self._image_context_id(plan)
        batch = collate_packed(sequences, self.data.seq_length, self.data.pad_token_id, img_context_id=context_id,
                               pixel_allocator=shared_float32 if in_worker and device == "cpu" else None,
                               pixel_values=pixels if intact else None)
        stats = {
            "sequences": len(sequences),
            "samples": sum(len(s.samples) for s in sequences),
            "images": decode_stats.decoded,
            "tiles": sum(s.num_tiles for s in sequences),
            "tokens": sum(s.num_tokens for s in sequences),
            "slots": len(sequences) * self.data.seq_length,
            "bad_images_corrupt": decode_stats.corrupt,
            "bad_images_too_large": decode_stats.too_large,
            "bad_samples": row.bad_samples,
            "replaced_samples": row.replaced,
            "unreplaced_samples": row.not_replaced,
            "decode_backend_counts": Counter(decode_stats.backend_counts),
            "build_seconds": time.perf_counter() - started,
            "bad_sample_log": row.logged,
        }
        return BuiltMicroBatch(batch, stats, plan)

    def _image_context_id(self, plan: MicroBatchPlan) -> int | None:
        if not plan.sequences or not plan.sequences[0].sources:
            return None
        ds = self.dataset(plan.stage, plan.sequences[0].sources[0])
        return (ds.manifest or {}).get("image_token_ids", {}).get("img_context")
