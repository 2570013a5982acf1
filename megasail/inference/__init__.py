"""Generation with a KV cache (megatron-core's static inference context), chat prompts, and batched
generation over streams of work items (``batched.py``)."""

from megasail.inference.batched import BatchedGenerator, BatchingConfig, ImageReadError, ItemOutcome, WorkItem
from megasail.inference.generate import GenerationResult, GenerationStats, Generator, Request, SamplingParams
from megasail.inference.prompt import (
    PromptSettings,
    build_prompt,
    build_prompt_from_tiles,
    pad_token_id,
    stop_token_ids,
)

__all__ = [
    "BatchedGenerator",
    "BatchingConfig",
    "GenerationResult",
    "GenerationStats",
    "Generator",
    "ImageReadError",
    "ItemOutcome",
    "PromptSettings",
    "Request",
    "SamplingParams",
    "WorkItem",
    "build_prompt",
    "build_prompt_from_tiles",
    "pad_token_id",
    "stop_token_ids",
]
