"""Data-parallel balancing: give every rank the same estimated step cost, not just the same count.

Packed sequences all have seq_length token slots, so the LLM's linear layers cost the same for each;
what differs is the vision tower (tiles) and attention within samples (sum of squared sample
lengths). `SequenceCostModel` prices both in forward FLOPs by the one convention of
`megasail.models.flops` (a training run builds it from its own model config,
`megasail.training.costs.cost_model`; `PRESET_COSTS` is generated from the same module), and
`assign_to_ranks` spreads a global batch over ranks by LPT (longest processing time first,
capacity-limited so every rank gets the same number of sequences).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megasail.data.loader.curriculum import PlannedSequence


@dataclass(frozen=True)
class SequenceCostModel:
    """Forward FLOPs of one packed sequence: slots * token_flops + sum(l^2) * pair_flops + tiles * tile_flops."""

    token_flops: float  # LLM linear layers + output layer, per token slot
    pair_flops: float  # attention scores + context per squared sample length (causal: l^2 / 2 pairs)
    tile_flops: float  # ViT + projector, per 448px tile

    @classmethod
    def from_preset(cls, name: str) -> SequenceCostModel:
        """Prices of a released model size, for the loader used alone (benchmarks, tests); a training
        run passes the cost model of its own model config (``megasail.training.costs.cost_model``)."""
        if name not in PRESET_COSTS:
            raise ValueError(f"unknown cost model preset {name!r}; choose one of {sorted(PRESET_COSTS)}")
        return PRESET_COSTS[name]

    def sequence_cost(self, lengths: Sequence[int], tiles: int, seq_length: int) -> float:
        squares = float(sum(int(n) * int(n) for n in lengths))
        return seq_length * self.token_flops + squares * self.pair_flops + tiles * self.tile_flops

    def costs(self, sequences: Sequence[PlannedSequence], seq_length: int) -> np.ndarray:
        """float64[len(sequences)] estimated forward FLOPs of each sequence."""
        return np.array([self.sequence_cost(s.lengths, s.num_tiles, seq_length) for s in sequences])


DEFAULT_COST_PRESET = "sail_vl_2b"  # the loader used alone (no model config) prices sequences as the 2B model

# BEGIN PRESET_COSTS: written by tools/generate_preset_costs.py from megasail.models.flops
# (a test fails when they differ; do not edit by hand), so that the data layer imports nothing from
# megasail.models: per token slot, per squared sample length (l^2 / 2 causal pairs), per 448px tile
PRESET_COSTS = {
    "sail_vl_2b": SequenceCostModel(token_flops=3087138816.0, pair_flops=86016.0, tile_flops=728022220800.0),
    "sail_vl_8b": SequenceCostModel(
        token_flops=14140571648.0, pair_flops=200704.0, tile_flops=737685897216.0
    ),
    "tiny": SequenceCostModel(token_flops=19742720.0, pair_flops=512.0, tile_flops=759824896.0),
}
# END PRESET_COSTS


def assign_to_ranks(costs: np.ndarray, dp_size: int, balance: bool = True) -> list[list[int]]:
    """Split len(costs) sequences over dp_size ranks, the same number each.

    balance=False: rank r takes the contiguous slice r (megatron's default).
    balance=True: LPT greedy: sequences by decreasing cost (index breaks ties) each go to the rank
    with the least load that still has room (lowest rank breaks ties). Deterministic.

    Returns, per rank, its sequence indices in increasing order.
    """
    n = len(costs)
    if n % dp_size:
        raise ValueError(f"{n} sequences do not split evenly over {dp_size} data-parallel ranks")
    per_rank = n // dp_size
    if not balance:
        return [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(dp_size)]
    order = np.argsort(-np.asarray(costs, dtype=np.float64), kind="stable")
    heap = [(0.0, r) for r in range(dp_size)]  # ranks with room, by (load, rank)
    assigned: list[list[int]] = [[] for _ in range(dp_size)]
    for i in order.tolist():
        load, rank = heapq.heappop(heap)
        assigned[rank].append(i)
        if len(assigned[rank]) < per_rank:
            heapq.heappush(heap, (load + float(costs[i]), rank))
    return [sorted(a) for a in assigned]


def imbalance(costs: np.ndarray, assignment: list[list[int]]) -> float:
    """Slowest rank's cost / mean rank cost (1.0 = perfectly even)."""
    loads = np.array([float(np.sum(np.asarray(costs)[idx])) for idx in assignment])
    return float(loads.max() / loads.mean()) if loads.mean() > 0 else 1.0
