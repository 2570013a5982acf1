"""Batched generation over a stream of work items: read, bucket by tile count, decode, prompt, generate.

A work item is one prompt with its images, given as a loader (``WorkItem.read_images``) so that
bytes are read only when the item is about to be batched, and read again on a retry::

    items --read + header--> tile count --bucket by tiles--> batch of `batch_size`
          --decode_tiles (one call per batch)--> build_prompt_from_tiles --> Generator.generate
          --> one ItemOutcome per item (the generated text, or why it has none)

Buckets: items wait in a bucket per total tile count until it holds ``batch_size`` of them, so a
batch's prompts have (nearly) equal lengths and left padding stays small; at the end the remaining
items are flushed in tile order. At most (distinct tile counts) x (batch_size - 1) items wait.

Bad images: an item whose images cannot be read (the loader raises) or decoded is retried once, in a
batch of its own kind (retried items only, read afresh); failing again, it becomes an outcome with
``error_reason`` and ``error_message``. No item is dropped.

Use (every rank of a model-parallel group runs this; only its first rank gets outcomes)::

    batched = BatchedGenerator(Generator(model, pad_id), tokenizer, prompt_settings, sampling_params,
                               BatchingConfig(batch_size=16))
    items = (WorkItem(q["id"], q["question"], lambda q=q: [open(q["image"], "rb").read()]) for q in rows)
    for outcomes in batched.run(items if batched.is_source else None):
        for o in outcomes:  # o.text / o.result.token_ids / o.result.logit_gaps, or o.error_reason
            ...

Model parallel: every rank of a tensor/pipeline-parallel group calls ``run`` together. The group's
first rank (TP rank 0 of the first stage) reads and decodes; it sends each batch's token ids to the
group and its pixels to the first stage's TP ranks, so the group generates the same batch. Only
that rank yields outcomes; no collective spans data-parallel replicas, which run independently.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megasail.data.images.decode import ImageDecodeError, decode_tiles, read_header
from megasail.data.images.formats import DEFAULT_MAX_IMAGE_PIXELS
from megasail.data.images.tiling import num_tiles
from megasail.inference.generate import GenerationResult, Generator, Request, SamplingParams
from megasail.inference.prompt import PromptSettings, build_prompt_from_tiles


class ImageReadError(Exception):
    """Raised by a ``read_images`` loader: ``reason`` is a short code (e.g. "image_missing")."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class WorkItem:
    """One prompt: ``question`` text, its images read by ``read_images()`` (encoded bytes, one per
    image; may raise ``ImageReadError`` or any OSError), and an opaque ``payload`` handed back."""

    id: str
    question: str
    read_images: Callable[[], Sequence[bytes]]
    payload: Any = None


@dataclass
class ItemOutcome:
    """What became of one item: ``result``/``text`` when generated, else ``error_reason``/``error_message``."""

    item: WorkItem
    result: GenerationResult | None = None
    text: str = ""
    tiles: int = 0  # tiles of all its images (thumbnails included)
    error_reason: str | None = None
    error_message: str | None = None
    attempts: int = 1


@dataclass
class BatchingConfig:
    batch_size: int = 16
    bucket: bool = True  # group items by tile count (else first come, first batched)
    retry_failed: bool = True  # read and decode a failed item once more before giving up on it
    prefetch_batches: int = 2  # batches read and decoded ahead in a thread while the model generates
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


@dataclass
class _Ready:
    item: WorkItem
    images: list[bytes]
    tiles: int
    attempt: int


@dataclass
class _Batch:
    ready: list[_Ready] = field(default_factory=list)  # items with prompts, in request order
    requests: list[Request] = field(default_factory=list)
    failed: list[ItemOutcome] = field(default_factory=list)  # given up on (second failure)


class BatchedGenerator:
    """Generate for a stream of ``WorkItem``s in bucketed, left-padded, KV-cached batches.

    ``run(items)`` yields, on the model-parallel group's first rank, one list of ``ItemOutcome`` per
    batch (generated items and items given up on); on the group's other ranks it yields nothing and
    returns when the first rank's items are exhausted (they may pass ``items=None``).
    """

    def __init__(
        self,
        generator: Generator,
        tokenizer,
        settings: PromptSettings,
        params: SamplingParams,
        config: BatchingConfig | None = None,
        use_cache: bool = True,
    ):
        self.generator = generator
        self.tokenizer = tokenizer
        self.settings = settings
        self.params = params
        self.config = config or BatchingConfig()
        self.use_cache = use_cache
        self.stop = set(params.stop_token_ids)
        self._init_group()

    # -- the model-parallel group -------------------------------------------------------------------

    def _init_group(self) -> None:
        self.mp_group = parallel_state.get_model_parallel_group()
        self.mp_size = dist.get_world_size(self.mp_group) if dist.is_initialized() else 1
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.first_stage = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        self.is_source = tp_rank == 0 and self.first_stage
        self.source_rank = dist.get_rank() if dist.is_initialized() else 0
        if self.mp_size > 1:  # once: which global rank of this group reads the data
            flags = [None] * self.mp_size
            dist.all_gather_object(flags, (dist.get_rank(), self.is_source), group=self.mp_group)
            self.source_rank = next(rank for rank, source in flags if source)

    def _share(self, batch: list[Request] | None) -> list[Request] | None:
        """The source's batch on every rank of the model-parallel group (None = no more batches)."""
        if self.mp_size == 1:
            return batch
        meta = [None]
        if self.is_source:
            meta = [None if batch is None else [(r.input_ids, _tile_count(r)) for r in batch]]
        dist.broadcast_object_list(meta, src=self.source_rank, group=self.mp_group)
        if meta[0] is None:
            return None
        counts = [n for _, n in meta[0]]
        pixels = None
        if self.first_stage and sum(counts):  # only the first stage embeds images
            if self.is_source:
                pixels = torch.cat([r.pixel_values for r in batch if r.pixel_values is not None])
                pixels = pixels.to(self.generator.device, torch.float32)
            else:
                size = self.settings.tile_size
                pixels = torch.empty(sum(counts), 3, size, size, device=self.generator.device)
            dist.broadcast(
                pixels,
                src=parallel_state.get_tensor_model_parallel_src_rank(),
                group=parallel_state.get_tensor_model_parallel_group(),
            )
        if self.is_source:
            return batch
        requests, at = [], 0
        for ids, n in meta[0]:
            requests.append(Request(ids, pixels[at : at + n] if pixels is not None and n else None))
            at += n
        return requests

    # -- reading, bucketing, decoding (the source rank) ---------------------------------------------

    def _read(self, item: WorkItem, attempt: int) -> _Ready | ItemOutcome:
        """Bytes and tile count of an item, or an outcome saying why it could not be read."""
        try:
            images = [bytes(b) for b in item.read_images()]
            tiles = 0
            for index, data in enumerate(images):
                try:
                    header = read_header(data, self.config.max_image_pixels)
                except ImageDecodeError as e:
                    raise ImageReadError(f"image_{e.kind}", f"image {index}: {e.reason}") from None
                tiles += num_tiles(
                    header.width,
                    header.height,
                    self.settings.max_tiles,
                    self.settings.min_tiles,
                    self.settings.tile_size,
                )
        except ImageReadError as e:
            return ItemOutcome(item, error_reason=e.reason, error_message=e.message, attempts=attempt)
        except OSError as e:
            return ItemOutcome(
                item, error_reason="image_unreadable", error_message=f"{type(e).__name__}: {e}", attempts=attempt
            )
        return _Ready(item, images, tiles, attempt)

    def _decode(self, group: list[_Ready]) -> tuple[_Batch, list[ItemOutcome]]:
        """(a batch of the items that decoded, outcomes of those that did not) with one decode call."""
        flat = [data for ready in group for data in ready.images]
        tiles = decode_tiles(
            flat,
            self.settings.max_tiles,
            backend=self.settings.decode_backend,
            tile_size=self.settings.tile_size,
            min_tiles=self.settings.min_tiles,
            max_image_pixels=self.config.max_image_pixels,
            on_error="skip",
        )
        batch, bad, at = _Batch(), [], 0
        for ready in group:
            mine = tiles[at : at + len(ready.images)]
            at += len(ready.images)
            missing = [i for i, t in enumerate(mine) if t is None]
            if missing:
                bad.append(
                    ItemOutcome(
                        ready.item,
                        error_reason="image_corrupt",
                        error_message=f"image {missing[0]} could not be decoded",
                        attempts=ready.attempt,
                    )
                )
                continue
            ids, pixels = build_prompt_from_tiles(self.tokenizer, self.settings, ready.item.question, mine)
            batch.ready.append(ready)
            batch.requests.append(Request(ids, pixels))
        return batch, bad

    def _batches(self, items: Iterable[WorkItem]) -> Iterator[_Batch]:
        size = self.config.batch_size
        buckets: dict[int, list[_Ready]] = {}
        retry: list[WorkItem] = []

        def first_try(group: list[_Ready]) -> Iterator[_Batch]:
            batch, bad = self._decode(group)
            for outcome in bad:
                if self.config.retry_failed:
                    retry.append(outcome.item)
                else:
                    batch.failed.append(outcome)
            if batch.requests or batch.failed:
                yield batch

        for item in items:
            ready = self._read(item, attempt=1)
            if isinstance(ready, ItemOutcome):
                if self.config.retry_failed:
                    retry.append(item)
                else:
                    yield _Batch(failed=[ready])
            else:
                key = ready.tiles if self.config.bucket else 0
                bucket = buckets.setdefault(key, [])
                bucket.append(ready)
                if len(bucket) >= size:
                    yield from first_try(buckets.pop(key))
            if len(retry) >= size:
                yield from self._retry(retry[:size])
                del retry[:size]
        rest = [ready for key in sorted(buckets) for ready in buckets[key]]  # tile order: little padding
        for start in range(0, len(rest), size):
            yield from first_try(rest[start : start + size])
        for start in range(0, len(retry), size):
            yield from self._retry(retry[start : start + size])

    def _retry(self, items: list[WorkItem]) -> Iterator[_Batch]:
        """The second and last try of failed items, read afresh, in a batch of their own."""
        group, failed = [], []
        for item in items:
            ready = self._read(item, attempt=2)
            (failed if isinstance(ready, ItemOutcome) else group).append(ready)
        batch, bad = self._decode(group) if group else (_Batch(), [])
        batch.failed = failed + bad
        if batch.requests or batch.failed:
            yield batch

    # -- generation ---------------------------------------------------------------------------------

    def run(self, items: Iterable[WorkItem] | None) -> Iterator[list[ItemOutcome]]:
        if not self.is_source:
            while (requests := self._share(None)) is not None:
                self.generator.generate(requests, self.params, use_cache=self.use_cache)
            return
        batches = self._batches(items if items is not None else ())
        if self.config.prefetch_batches > 0:
            batches = _prefetched(batches, self.config.prefetch_batches)
        try:
            for batch in batches:
                outcomes = list(batch.failed)
                if batch.requests:
                    self._share(batch.requests)
                    results = self.generator.generate(batch.requests, self.params, use_cache=self.use_cache)
                    for ready, result in zip(batch.ready, results, strict=True):
                        text = self.tokenizer.decode([t for t in result.token_ids if t not in self.stop])
                        outcomes.append(ItemOutcome(ready.item, result, text, ready.tiles, attempts=ready.attempt))
                yield outcomes
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        self._share(None)


def _tile_count(request: Request) -> int:
    return 0 if request.pixel_values is None else int(request.pixel_values.shape[0])


class _prefetched:
    """Iterate ``source`` in a background thread, up to ``depth`` items ahead (image reading and
    decoding overlap generation; PIL, DALI and torch release the GIL while they work)."""

    _END = object()

    def __init__(self, source: Iterator, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self._thread = threading.Thread(target=self._fill, args=(source, device), daemon=True)
        self._thread.start()

    def _put(self, value) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, source: Iterator, device: int | None) -> None:
        if device is not None:
            torch.cuda.set_device(device)  # DALI `mixed` decodes on this rank's GPU, not GPU 0
        try:
            for value in source:
                if not self._put((value, None)):
                    return
        except BaseException as error:  # noqa: BLE001 - re-raised in the consuming thread
            self._put((None, error))
            return
        self._put((self._END, None))

    def __iter__(self):
        return self

    def __next__(self):
        value, error = self._queue.get()
        if error is not None:
            raise error
        if value is self._END:
            raise StopIteration
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
