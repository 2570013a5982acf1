"""Generation with a KV cache (megatron-core's static inference context) and chat prompts."""

from megasail.inference.generate import GenerationResult, GenerationStats, Generator, Request, SamplingParams
from megasail.inference.prompt import PromptSettings, build_prompt, stop_token_ids

__all__ = [
    "GenerationResult",
    "GenerationStats",
    "Generator",
    "PromptSettings",
    "Request",
    "SamplingParams",
    "build_prompt",
    "stop_token_ids",
]
