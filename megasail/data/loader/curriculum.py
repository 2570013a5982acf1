"""The curriculum: which samples form which packed sequence, in which order, stage by stage.

A stage's blended sample stream is cut into chunks of `pack_chunk_samples`, each chunk into
epoch-clean segments; every segment is packed and its rows shuffled. docs/loader.md ("Order") has
the rules and why; everything here is a pure function of (config, stage, chunk), computed from the
index alone (token and tile counts), so any position is reached in O(1).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from megasail.data.format import index_helpers
from megasail.data.format.counts import SampleCounter
from megasail.data.format.reader import IndexedMultimodalDataset
from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
from megasail.data.loader.packing import pack_samples
from megasail.data.loader.state import LoaderPosition

# the roles of derived seeds (the last part of derive_seed's input)
_SEED_PACK, _SEED_ROW_ORDER = 1, 2


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers (seed, stage, source, epoch, ...), the same on every platform."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


@dataclass
class SourceIndex:
    """One source of a stage: its dataset and the counter of its samples' tokens and tiles (computed
    per chunk from the index, so nothing per-sample is held for the whole dataset)."""

    config: SourceConfig
    dataset: IndexedMultimodalDataset
    counter: SampleCounter

    @property
    def name(self) -> str:
        return self.config.display_name

    @property
    def size(self) -> int:
        return len(self.dataset)


class EmptySourceError(ValueError):
    """A source prefix that holds no sample (its preprocessing kept none)."""


def open_nonempty(source: SourceConfig, stage_name: str) -> IndexedMultimodalDataset:
    """Open a prefix; an empty one is refused, naming the stage, the prefix and its manifest's rejects."""
    dataset = IndexedMultimodalDataset(source.prefix)
    if len(dataset) == 0:
        from megasail.data.preprocess.rejects import empty_prefix_reason

        raise EmptySourceError(
            f"data stage {stage_name!r}: source {source.prefix} holds no samples "
            f"({empty_prefix_reason(source.prefix, dataset.manifest)}); fix its inputs and preprocess it "
            "again, or remove it from the stage"
        )
    return dataset


def open_source(source: SourceConfig, data: DataConfig, block: int = 1 << 20,
                dataset: IndexedMultimodalDataset | None = None) -> SourceIndex:
    """Open a prefix (or take `dataset`, opened already) and check that every sample packs
    (1..seq_length tokens at the run's tiling), reading the index in blocks so memory stays flat
    whatever its size."""
    dataset = dataset if dataset is not None else IndexedMultimodalDataset(source.prefix)
    counter = SampleCounter(dataset, data.max_tiles, data.min_tiles, data.tile_size)
    bad_count, first_bad = 0, None
    for lo in range(0, len(dataset), block):
        lengths, _ = counter.range_counts(lo, min(lo + block, len(dataset)))
        bad = np.flatnonzero((lengths > data.seq_length) | (lengths < 1))
        if bad.size and first_bad is None:
            first_bad = (lo + int(bad[0]), int(lengths[bad[0]]))
        bad_count += bad.size
    if first_bad is not None:
        i, n = first_bad
        raise ValueError(
            f"{source.prefix}: sample {i} has {n} tokens at max_tiles={data.max_tiles}, "
            f"outside 1..seq_length={data.seq_length} ({bad_count} such samples); lower data.max_tiles, "
            "raise data.seq_length, or re-run preprocessing with a smaller max_seq_length"
        )
    return SourceIndex(source, dataset, counter)


@dataclass(frozen=True)
class PlannedSequence:
    """One packed sequence of the plan: its samples as (source, sample index) and their counts.

    A sequence without samples (pack -1) pads the last global batch of a stage.
    """

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


def padding_sequence(stage: int) -> PlannedSequence:
    return PlannedSequence(stage, -1, -1, (), (), (), ())


@dataclass(frozen=True)
class Chunk:
    """Chunk c of a stage in training order: pack p holds members[offsets[p]:offsets[p+1]].

    num_samples < pack_chunk_samples only in the stage's last chunk (cut at its budget); `last`
    marks that chunk, and `tokens` counts the tokens of its samples.
    """

    sources: np.ndarray  # int32[n] source of each member, in pack order
    samples: np.ndarray  # int64[n] sample index within its source
    lengths: np.ndarray  # int64[n] tokens of each member after image expansion
    tiles: np.ndarray  # int64[n] image tiles of each member
    offsets: np.ndarray  # int64[P+1]
    tokens: int
    last: bool

    @property
    def num_packs(self) -> int:
        return len(self.offsets) - 1


def blend_chunk(weights: np.ndarray, sizes: np.ndarray, chunk_samples: int) -> np.ndarray:
    """int32[chunk_samples]: the source of each slot of every chunk of a stage's blend."""
    blend_source, _ = index_helpers.blend_indices(weights, chunk_samples, np.maximum(sizes, 1))
    return blend_source.astype(np.int32)


def samples_before_repeat(weights: np.ndarray, sizes: np.ndarray, chunk_samples: int) -> int:
    """Blended samples of a stage before any of its sources starts its second epoch: one pass, in
    which no sample is drawn twice (every sample of every source once when weights follow sizes)."""
    blend = blend_chunk(weights, sizes, chunk_samples)
    picks = np.bincount(blend, minlength=len(sizes))
    first_repeat = []
    for k, size in enumerate(sizes.tolist()):
        if picks[k]:  # a source of weight 0 is never drawn
            chunks, rest = divmod(size, int(picks[k]))
            first_repeat.append(chunks * chunk_samples + int(np.flatnonzero(blend == k)[rest]))
    return min(first_repeat)


class StagePlan:
    """The packed-sequence stream of one stage, chunk by chunk (docs/loader.md, "Order")."""

    def __init__(self, stage_index: int, stage: StageConfig, sources: list[SourceIndex], data: DataConfig,
                 cache_size: int = 2):
        self.stage_index = stage_index
        self.stage = stage
        self.sources = sources
        self.data = data
        self.chunk_samples = data.pack_chunk_samples
        weights = np.array([s.config.weight for s in sources], dtype=np.float64)
        self.sizes = np.array([s.size for s in sources], dtype=np.int64)
        self.blend_source = blend_chunk(weights, self.sizes, self.chunk_samples)  # int32[C]
        self.picks_per_chunk = np.bincount(self.blend_source, minlength=len(sources)).astype(np.int64)
        # count of each slot's source among the chunk's earlier slots
        self.count_in_chunk = np.zeros(self.chunk_samples, dtype=np.int64)
        for k in range(len(sources)):
            where = np.flatnonzero(self.blend_source == k)
            self.count_in_chunk[where] = np.arange(len(where))
        self._chunks: OrderedDict[int, Chunk] = OrderedDict()
        self._cache_size = cache_size

    def epoch_samples(self, source: int, epoch: int, positions: np.ndarray) -> np.ndarray:
        """Samples at `positions` of one source's seeded epoch order (a bijection per epoch, O(1) memory)."""
        seed = derive_seed(self.data.seed, self.stage_index, source, epoch)
        return index_helpers.permute_indices(positions, int(self.sizes[source]), seed)

    def source_epochs(self, chunk: int) -> list[int]:
        """Epoch each source is in at the start of a chunk."""
        return [int(chunk * n // max(size, 1)) for n, size in zip(self.picks_per_chunk, self.sizes, strict=True)]

    def _picks(self, chunk: int) -> np.ndarray:
        """int64[C] each slot's pick count g within its source over the stage (epoch g // size)."""
        return chunk * self.picks_per_chunk[self.blend_source] + self.count_in_chunk

    def chunk_members(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """(source int32[C], sample int64[C]) of the chunk's blended slots, before packing."""
        picks = self._picks(chunk)
        samples = np.empty(self.chunk_samples, dtype=np.int64)
        for k in range(len(self.sources)):
            where = np.flatnonzero(self.blend_source == k)
            if not len(where):
                continue
            epochs, positions = np.divmod(picks[where], self.sizes[k])
            for epoch in np.unique(epochs).tolist():
                sel = epochs == epoch
                samples[where[sel]] = self.epoch_samples(k, epoch, positions[sel])
        return self.blend_source, samples

    def segment_starts(self, chunk: int, end: int) -> np.ndarray:
        """Slots of chunk[:end] that start a segment: 0, and every pick that opens a new epoch of its
        source (sources of one sample excepted: their every pick is a new epoch, and nothing can repeat
        before them)."""
        picks = self._picks(chunk)[:end]
        sizes = self.sizes[self.blend_source[:end]]
        opens = (picks % np.maximum(sizes, 1) == 0) & (picks > 0) & (sizes > 1)
        opens[:1] = True
        return np.flatnonzero(opens)

    def chunk_end(self, chunk: int, lengths: np.ndarray, tokens_before: int) -> tuple[int, bool]:
        """(members of `chunk` the stage trains, whether it is the stage's last chunk): a stage ends
        exactly at its budget (the sample that reaches a token budget is the last)."""
        end, last = self.chunk_samples, False
        if self.stage.budget_samples is not None:
            left = self.stage.budget_samples - chunk * self.chunk_samples
            if left <= self.chunk_samples:
                end, last = max(left, 0), True
        if self.stage.budget_tokens is not None:
            reach = np.cumsum(lengths[:end]) + tokens_before
            hit = int(np.searchsorted(reach, self.stage.budget_tokens))  # first slot whose total reaches it
            if hit < end:
                end, last = hit + 1, True
        return end, last

    def chunk(self, chunk: int, tokens_before: int = 0) -> Chunk:
        """Chunk `chunk` in training order; `tokens_before` = the stage's tokens in earlier chunks (it
        decides where a token budget cuts). Cached: the loader reads chunks in order."""
        if chunk not in self._chunks:
            sources, samples = self.chunk_members(chunk)
            lengths = np.empty(len(samples), dtype=np.int64)
            tiles = np.empty(len(samples), dtype=np.int64)
            for k, source in enumerate(self.sources):
                sel = sources == k
                lengths[sel], tiles[sel] = source.counter.counts(samples[sel])
            end, last = self.chunk_end(chunk, lengths, tokens_before)
            starts = self.segment_starts(chunk, end).tolist() + [end]
            orders, sizes = [], []
            for s, (lo, hi) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
                groups = pack_samples(lengths[lo:hi], self.data.seq_length,
                                      derive_seed(self.data.seed, self.stage_index, chunk, s, _SEED_PACK),
                                      self.data.pack_window)
                # packing decides which samples share a row; when a row trains is a seeded shuffle
                row_order = index_helpers.shuffle_indices(
                    len(groups), derive_seed(self.data.seed, self.stage_index, chunk, s, _SEED_ROW_ORDER))
                for r in row_order.tolist():
                    orders.append(groups[r] + lo)
                    sizes.append(len(groups[r]))
            order = np.concatenate(orders) if orders else np.zeros(0, dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
            self._chunks[chunk] = Chunk(sources[order], samples[order], lengths[order], tiles[order], offsets,
                                        int(lengths[:end].sum()), last)
            while len(self._chunks) > self._cache_size:
                self._chunks.popitem(last=False)
        return self._chunks[chunk]

    def sequence(self, chunk: int, pack: int, tokens_before: int = 0) -> PlannedSequence:
        c = self.chunk(chunk, tokens_before)
        lo, hi = int(c.offsets[pack]), int(c.offsets[pack + 1])
        return PlannedSequence(self.stage_index, chunk, pack, tuple(c.sources[lo:hi].tolist()),
                               tuple(c.samples[lo:hi].tolist()), tuple(c.lengths[lo:hi].tolist()),
                               tuple(c.tiles[lo:hi].tolist()))


class Curriculum:
    """Global batches of packed sequences over all stages, from any position (no replay).

    Stage plans are built lazily: a stage's sources are checked (length of every sample) the first
    time it is reached. Every source of every stage is opened at once, so an empty one (EmptySourceError)
    stops the run before its first step, not at the stage that draws from it.
    """

    def __init__(self, data: DataConfig):
        data.validate()
        self.data = data
        self._plans: dict[int, StagePlan] = {}
        self._opened: dict[str, SourceIndex] = {}
        self._datasets: dict[str, IndexedMultimodalDataset] = {}
        for stage in data.stages:
            for source in stage.sources:
                if source.prefix not in self._datasets:
                    self._datasets[source.prefix] = open_nonempty(source, stage.name)

    def plan(self, stage: int) -> StagePlan:
        if stage not in self._plans:
            sources = []
            for source in self.data.stages[stage].sources:
                key = source.prefix
                if key not in self._opened:
                    self._opened[key] = open_source(source, self.data, dataset=self._datasets[key])
                sources.append(dataclasses.replace(self._opened[key], config=source))
            self._plans[stage] = StagePlan(stage, self.data.stages[stage], sources, self.data)
        return self._plans[stage]

    def global_batch(self, position: LoaderPosition) -> tuple[list[PlannedSequence], LoaderPosition]:
        """The global batch starting at `position` and the position after it. The batch that ends a
        stage (its budget spent exactly) is filled up with padding sequences; the position after it is
        the next stage's start, or finished."""
        if position.finished:
            raise StopIteration
        plan = self.plan(position.stage)
        chunk, pack, before = position.chunk, position.pack, position.chunk_tokens
        sequences: list[PlannedSequence] = []
        ended = False
        while len(sequences) < self.data.global_batch_size:
            current = plan.chunk(chunk, before)
            if pack >= current.num_packs:
                if current.last:
                    ended = True
                    sequences += [padding_sequence(position.stage)] * (self.data.global_batch_size - len(sequences))
                    break
                chunk, pack, before = chunk + 1, 0, before + current.tokens
                continue
            sequences.append(plan.sequence(chunk, pack, before))
            pack += 1
        if not ended:  # a batch that takes the last row of the last chunk ends the stage too
            current = plan.chunk(chunk, before)
            ended = current.last and pack >= current.num_packs
        after = dataclasses.replace(
            position, chunk=chunk, pack=pack, chunk_tokens=before, stage_batches=position.stage_batches + 1,
            stage_tokens=position.stage_tokens + sum(s.num_tokens for s in sequences),
            stage_samples=position.stage_samples + sum(len(s.samples) for s in sequences),
            global_batches=position.global_batches + 1,
        )
        if ended:
            if position.stage + 1 < len(self.data.stages):
                after = LoaderPosition(stage=position.stage + 1, global_batches=after.global_batches)
            else:
                after = dataclasses.replace(after, finished=True)
        return sequences, after
