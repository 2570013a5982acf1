"""The data-parallel balancing cost model of a run, priced by the one FLOPs convention.

``megasail.models.flops`` holds the prices (and every other FLOPs count); this wraps them in the
loader's ``SequenceCostModel``, which lives in the data layer and imports nothing from the models.
"""

from __future__ import annotations

from megasail.data.loader.balance import SequenceCostModel
from megasail.models.config import ModelConfig
from megasail.models.flops import balancing_prices


def cost_model(config: ModelConfig) -> SequenceCostModel:
    """The loader's DP balancing prices from the run's model config (causal LLM attention)."""
    return SequenceCostModel(**balancing_prices(config))
