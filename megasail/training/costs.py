"""What a step costs in FLOPs: the DP balancing cost model and the FLOPs counted for MFU.

Both come from the run's own model config (``megasail.models.flops``), split into parts:
ViT per tile, projector per tile, LLM per token slot (linear layers + output layer) and LLM
attention per (query, key) pair. Attention is causal in the LLM: a segment of l tokens has
l (l + 1) / 2 pairs, not l^2 (the ViT's bidirectional attention keeps its full square).

Training multiplies forward FLOPs per part: 3 when the part trains (forward, activation
gradient, weight gradient), 2 when it is frozen but something before it trains (the gradient
still flows through it), 1 when nothing before it trains (forward only).
"""

from __future__ import annotations

from dataclasses import dataclass

from megasail.data.loader.balance import SequenceCostModel
from megasail.models import flops
from megasail.models.config import ModelConfig

ORDER = ("vision", "projector", "language")  # the order gradients flow back through


@dataclass(frozen=True)
class FlopsModel:
    """Forward FLOPs per unit of work (2 per multiply-add)."""

    vit_per_tile: float  # patch embedding + the ViT layers that run (bidirectional attention)
    projector_per_tile: float  # pixel-shuffle MLP
    llm_per_slot: float  # decoder linear layers + output layer, per token slot (padding included)
    llm_per_pair: float  # decoder attention (scores + context) per causal (query, key) pair, all layers

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> FlopsModel:
        lm = config.language
        tokens, width, h = config.tokens_per_tile, config.projector_input_size, lm.hidden_size
        projector = 2 * tokens * (width * h + h * h)
        one, two = flops.language_layer_flops(config, 1), flops.language_layer_flops(config, 2)
        pair = (two - 2 * one) / 2  # language_layer_flops(L) = L * linear + L^2 * pair
        return cls(
            vit_per_tile=float(flops.vision_flops_per_tile(config) - projector),
            projector_per_tile=float(projector),
            llm_per_slot=float(lm.num_layers * (one - pair) + flops.language_head_flops(config, 1)),
            llm_per_pair=float(lm.num_layers * pair),
        )

    def forward_parts(self, tiles: int, segment_lengths: list[int], slots: int) -> dict[str, float]:
        """Forward FLOPs per part for ``tiles`` image tiles and LLM sequences of ``slots`` token slots
        holding segments of the given lengths (causal attention within each)."""
        pairs = sum(n * (n + 1) // 2 for n in segment_lengths)
        return {
            "vision": tiles * self.vit_per_tile,
            "projector": tiles * self.projector_per_tile,
            "language": slots * self.llm_per_slot + pairs * self.llm_per_pair,
        }

    def training_flops(self, parts: dict[str, float], trainable: list[str]) -> float:
        """FLOPs a training step executes for forward ``parts`` when ``trainable`` parts learn."""
        total, upstream = 0.0, False
        for part in ORDER:
            if part in trainable:
                factor = 3
            elif upstream:
                factor = 2
            else:
                factor = 1
            upstream = upstream or part in trainable
            total += factor * parts[part]
        return total

    def describe(self, trainable: list[str]) -> str:
        """The formula's parts and this stage's multipliers, printed at start."""
        factors, upstream = {}, False
        for part in ORDER:
            factors[part] = 3 if part in trainable else (2 if upstream else 1)
            upstream = upstream or part in trainable
        return (
            f"FLOPs per step = {factors['vision']} x ViT {self.vit_per_tile / 1e9:.3f} GF/tile"
            f" + {factors['projector']} x projector {self.projector_per_tile / 1e9:.3f} GF/tile"
            f" + {factors['language']} x LLM ({self.llm_per_slot / 1e6:.3f} MF/token slot"
            f" + {self.llm_per_pair / 1e3:.3f} KF/causal pair)"
            f"  [3 = trains, 2 = frozen with gradient flowing through, 1 = forward only]"
        )


def cost_model(config: ModelConfig) -> SequenceCostModel:
    """The loader's DP balancing prices from the run's model config (causal LLM attention)."""
    f = FlopsModel.from_model_config(config)
    # SequenceCostModel charges sum(l^2) * pair_flops; a causal segment has about l^2 / 2 pairs
    return SequenceCostModel(
        token_flops=f.llm_per_slot,
        pair_flops=f.llm_per_pair / 2,
        tile_flops=f.vit_per_tile + f.projector_per_tile,
    )
