"""Mixtures and the curriculum: which samples form which packed sequence, stage by stage.

A stage's stream of packed sequences is cut into chunks of C blended samples (C =
DataConfig.pack_chunk_samples). Chunk c is a pure function of (seed, stage, c):

1. Blend: `index_helpers.blend_indices(weights, C, sizes)` gives the sources of the C slots; every
   chunk has the same composition, so source k contributes n_k samples to each chunk and its
   g-th pick overall is g = c * n_k + (its count within the chunk).
2. Epochs: pick g of source k reads sample perm_k,e[g % size_k] with e = g // size_k and perm_k,e a
   seeded shuffle per (stage, source, epoch): each epoch visits every sample once, in a new order.
3. Packing: `packing.pack_samples` packs the chunk's samples into sequences (seeded per chunk).

The curriculum walks stages in order; a stage ends after the global batch in which its token or
sample budget is spent. Nothing here reads tokens or pixels: only the index (token and tile counts).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from megasail.data.format import index_helpers
from megasail.data.format.reader import IndexedMultimodalDataset
from megasail.data.images.tiling import IMAGE_WRAPPER_TOKENS, TOKENS_PER_TILE
from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
from megasail.data.loader.packing import pack_samples
from megasail.data.loader.state import LoaderPosition


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers (seed, stage, source, epoch, ...), the same on every platform."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


@dataclass
class SourceIndex:
    """One source's per-sample counts, read from its index without decoding anything."""

    config: SourceConfig
    dataset: IndexedMultimodalDataset
    lengths: np.ndarray  # int64[N] tokens after image expansion
    tiles: np.ndarray  # int64[N] image tiles (thumbnails included)

    @property
    def name(self) -> str:
        return self.config.display_name


def open_source(source: SourceConfig, data: DataConfig) -> SourceIndex:
    """Open a prefix and compute its lengths and tiles; refuses samples that cannot be packed."""
    dataset = IndexedMultimodalDataset(source.prefix)
    lengths = dataset.token_counts(data.max_tiles, data.min_tiles, data.tile_size)
    text = dataset.text_token_counts()
    # with max_tiles=1 every image is 1 tile, so its expansion (258 tokens) counts the images
    images = (dataset.token_counts(1, 1, data.tile_size) - text) // (TOKENS_PER_TILE + IMAGE_WRAPPER_TOKENS)
    tiles = (lengths - text - IMAGE_WRAPPER_TOKENS * images) // TOKENS_PER_TILE
    bad = np.flatnonzero((lengths > data.seq_length) | (lengths < 1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{source.prefix}: sample {i} has {int(lengths[i])} tokens at max_tiles={data.max_tiles}, "
            f"outside 1..seq_length={data.seq_length} ({bad.size} such samples); lower data.max_tiles, "
            "raise data.seq_length, or re-run preprocessing with a smaller max_seq_length"
        )
    return SourceIndex(source, dataset, lengths.astype(np.int64), tiles.astype(np.int64))


@dataclass(frozen=True)
class PlannedSequence:
    """One packed sequence of the plan: its samples as (source, sample index) and their counts."""

    stage: int
    chunk: int
    pack: int
    sources: tuple[int, ...]
    samples: tuple[int, ...]
    lengths: tuple[int, ...]
    tiles: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def num_tiles(self) -> int:
        return sum(self.tiles)


@dataclass(frozen=True)
class Chunk:
    """Chunk c of a stage: pack p holds members[offsets[p]:offsets[p+1]] (rows of source, sample)."""

    sources: np.ndarray  # int32[C] source of each member, in pack order
    samples: np.ndarray  # int64[C] sample index within its source
    offsets: np.ndarray  # int64[P+1]

    @property
    def num_packs(self) -> int:
        return len(self.offsets) - 1


class StagePlan:
    """The packed-sequence stream of one stage, computed chunk by chunk (see module docstring)."""

    def __init__(self, stage_index: int, sources: list[SourceIndex], data: DataConfig, cache_size: int = 2):
        self.stage_index = stage_index
        self.sources = sources
        self.data = data
        self.chunk_samples = data.pack_chunk_samples
        weights = np.array([s.config.weight for s in sources], dtype=np.float64)
        self.sizes = np.array([len(s.lengths) for s in sources], dtype=np.int64)
        blend_source, _ = index_helpers.blend_indices(weights, self.chunk_samples, np.maximum(self.sizes, 1))
        self.blend_source = blend_source.astype(np.int32)  # int32[C] source of each slot of every chunk
        self.picks_per_chunk = np.bincount(self.blend_source, minlength=len(sources)).astype(np.int64)
        # count of each slot's source among the chunk's earlier slots
        self.count_in_chunk = np.zeros(self.chunk_samples, dtype=np.int64)
        for k in range(len(sources)):
            where = np.flatnonzero(self.blend_source == k)
            self.count_in_chunk[where] = np.arange(len(where))
        self._chunks: OrderedDict[int, Chunk] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def epoch_order(self, source: int, epoch: int) -> np.ndarray:
        """int64[size] sample order of one source in one epoch of this stage."""
        key = (source, epoch)
        if key not in self._perms:
            seed = derive_seed(self.data.seed, self.stage_index, source, epoch)
            self._perms[key] = index_helpers.shuffle_indices(int(self.sizes[source]), seed)
            while len(self._perms) > 2 * len(self.sources):
                self._perms.popitem(last=False)
        return self._perms[key]

    def source_epochs(self, chunk: int) -> list[int]:
        """Epoch each source is in at the start of a chunk."""
        return [int(chunk * n // max(size, 1)) for n, size in zip(self.picks_per_chunk, self.sizes, strict=True)]

    def chunk_members(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """(source int32[C], sample int64[C]) of the chunk's blended slots, before packing."""
        picks = chunk * self.picks_per_chunk[self.blend_source] + self.count_in_chunk
        samples = np.empty(self.chunk_samples, dtype=np.int64)
        for k in range(len(self.sources)):
            where = np.flatnonzero(self.blend_source == k)
            if not len(where):
                continue
            g = picks[where]
            epochs, positions = g // self.sizes[k], g % self.sizes[k]
            for epoch in np.unique(epochs).tolist():
                sel = epochs == epoch
                samples[where[sel]] = self.epoch_order(k, epoch)[positions[sel]]
        return self.blend_source, samples

    def chunk(self, chunk: int) -> Chunk:
        """Chunk `chunk`, packed (cached: the loader reads chunks in order)."""
        if chunk not in self._chunks:
            sources, samples = self.chunk_members(chunk)
            lengths = np.empty(len(samples), dtype=np.int64)
            for k, source in enumerate(self.sources):
                sel = sources == k
                lengths[sel] = source.lengths[samples[sel]]
            groups = pack_samples(lengths, self.data.seq_length, derive_seed(self.data.seed, self.stage_index,
                                                                             chunk, 1), self.data.pack_window)
            order = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(np.int64)
            self._chunks[chunk] = Chunk(sources[order], samples[order], offsets)
            while len(self._chunks) > self._cache_size:
                self._chunks.popitem(last=False)
        return self._chunks[chunk]

    def sequence(self, chunk: int, pack: int) -> PlannedSequence:
        c = self.chunk(chunk)
        lo, hi = int(c.offsets[pack]), int(c.offsets[pack + 1])
        sources, samples = c.sources[lo:hi].tolist(), c.samples[lo:hi].tolist()
        return PlannedSequence(
            self.stage_index, chunk, pack, tuple(sources), tuple(samples),
            tuple(int(self.sources[k].lengths[i]) for k, i in zip(sources, samples, strict=True)),
            tuple(int(self.sources[k].tiles[i]) for k, i in zip(sources, samples, strict=True)),
        )


def budget_spent(stage: StageConfig, position: LoaderPosition) -> bool:
    """True once the stage's token or sample budget is reached (a stage without budget never ends)."""
    by_tokens = stage.budget_tokens is not None and position.stage_tokens >= stage.budget_tokens
    by_samples = stage.budget_samples is not None and position.stage_samples >= stage.budget_samples
    return by_tokens or by_samples


class Curriculum:
    """Global batches of packed sequences over all stages, from any position (no replay).

    Stage plans are built lazily: a stage's sources are opened the first time it is reached.
    """

    def __init__(self, data: DataConfig):
        data.validate()
        self.data = data
        self._plans: dict[int, StagePlan] = {}
        self._opened: dict[str, SourceIndex] = {}

    def plan(self, stage: int) -> StagePlan:
        if stage not in self._plans:
            sources = []
            for source in self.data.stages[stage].sources:
                key = source.prefix
                if key not in self._opened:
                    self._opened[key] = open_source(source, self.data)
                sources.append(dataclasses.replace(self._opened[key], config=source))
            self._plans[stage] = StagePlan(stage, sources, self.data)
        return self._plans[stage]

    def global_batch(self, position: LoaderPosition) -> tuple[list[PlannedSequence], LoaderPosition]:
        """The global batch starting at `position` and the position after it (the next stage's start
        when this batch spends the stage's budget)."""
        if position.finished:
            raise StopIteration
        plan = self.plan(position.stage)
        chunk, pack = position.chunk, position.pack
        sequences = []
        while len(sequences) < self.data.global_batch_size:
            if pack >= plan.chunk(chunk).num_packs:
                chunk, pack = chunk + 1, 0
                continue
            sequences.append(plan.sequence(chunk, pack))
            pack += 1
        after = dataclasses.replace(
            position, chunk=chunk, pack=pack, stage_batches=position.stage_batches + 1,
            stage_tokens=position.stage_tokens + sum(s.num_tokens for s in sequences),
            stage_samples=position.stage_samples + sum(len(s.samples) for s in sequences),
            global_batches=position.global_batches + 1,
        )
        if budget_spent(self.data.stages[position.stage], after):
            if position.stage + 1 < len(self.data.stages):
                after = LoaderPosition(stage=position.stage + 1, global_batches=after.global_batches)
            else:
                after = dataclasses.replace(after, finished=True)
        return sequences, after
