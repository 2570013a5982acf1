"""Data curation: recaptioning images at scale (sources, split, prompt bank, filters, resumable output)."""

from megasail.curation.filters import FILTER_REASONS, FilterConfig, filter_reason
from megasail.curation.prompts import DEFAULT_PROMPTS, Prompt, PromptBank, load_prompt_bank
from megasail.curation.recaption import RecaptionConfig, RecaptionError, run_recaption
from megasail.curation.sources import ImageRecord, SourceError, open_source
from megasail.curation.split import shard_of

__all__ = [
    "DEFAULT_PROMPTS",
    "FILTER_REASONS",
    "FilterConfig",
    "ImageRecord",
    "Prompt",
    "PromptBank",
    "RecaptionConfig",
    "RecaptionError",
    "SourceError",
    "filter_reason",
    "load_prompt_bank",
    "open_source",
    "run_recaption",
    "shard_of",
]
