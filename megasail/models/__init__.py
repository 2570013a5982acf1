"""SAIL-VL model: configs, presets, and the megatron-core modules (vision tower, projector, VLM)."""

from megasail.models.config import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig
from megasail.models.presets import PRESETS, sail_vl_2b, sail_vl_8b, tiny

__all__ = [
    "PRESETS",
    "LanguageConfig",
    "ModelConfig",
    "ProjectorConfig",
    "VisionConfig",
    "sail_vl_2b",
    "sail_vl_8b",
    "tiny",
]
