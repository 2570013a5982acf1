"""Data-parallel balancing: give every rank the same estimated step cost, not just the same count.

Packed sequences all have seq_length token slots, so the LLM's linear layers cost the same for each;
what differs is the vision tower (tiles) and attention within samples (sum of squared sample
lengths). `SequenceCostModel` prices both in forward FLOPs from the model config
(`megasail.models.flops`), and `assign_to_ranks` spreads a global batch over ranks by LPT
(longest processing time first, capacity-limited so every rank gets the same number of sequences).
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
    pair_flops: float  # attention scores + context, per (query, key) pair within a sample
    tile_flops: float  # ViT + projector, per 448px tile

    @classmethod
    def from_model_config(cls, config) -> SequenceCostModel:
        """Prices from a `ModelConfig` (vision, projector and language dims)."""
        from megasail.models import flops

        layers = config.language.num_layers
        one, two = flops.language_layer_flops(config, 1), flops.language_layer_flops(config, 2)
        pair = (two - 2 * one) / 2  # language_layer_flops(L) = L * linear + L^2 * pair
        token = layers * (one - pair) + flops.language_head_flops(config, 1)
        return cls(token_flops=float(token), pair_flops=float(layers * pair),
                   tile_flops=float(flops.vision_flops_per_tile(config)))

    @classmethod
    def from_preset(cls, name: str) -> SequenceCostModel:
        from megasail.models.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown cost model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_model_config(PRESETS[name]())

    def sequence_cost(self, lengths: Sequence[int], tiles: int, seq_length: int) -> float:
        squares = float(sum(int(n) * int(n) for n in lengths))
        return seq_length * self.token_flops + squares * self.pair_flops + tiles * self.tile_flops

    def costs(self, sequences: Sequence[PlannedSequence], seq_length: int) -> np.ndarray:
        """float64[len(sequences)] estimated forward FLOPs of each sequence."""
        return np.array([self.sequence_cost(s.lengths, s.num_tiles, seq_length) for s in sequences])


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
