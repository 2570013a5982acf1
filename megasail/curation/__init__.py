"""Data curation: recaptioning images at scale (sources, split, prompt bank, filters, resumable output) and
scaling-curve fits. The tools in tools/ are thin CLIs over these."""

from megasail.curation.filters import FILTER_REASONS, FilterConfig, filter_reason
from megasail.curation.prompts import DEFAULT_PROMPTS, Prompt, PromptBank, load_prompt_bank
from megasail.curation.recaption import RecaptionConfig, RecaptionError, run_recaption
from megasail.curation.scaling import fit_curves, fit_form, fit_log_linear, fit_power_law
from megasail.curation.scaling_chinchilla import fit_chinchilla
from megasail.curation.scaling_points import PointsError, read_points, runs_series
from megasail.curation.sources import ImageRecord, SourceError, open_source
from megasail.curation.split import shard_of

__all__ = [
    "DEFAULT_PROMPTS",
    "FILTER_REASONS",
    "FilterConfig",
    "ImageRecord",
    "PointsError",
    "Prompt",
    "PromptBank",
    "RecaptionConfig",
    "RecaptionError",
    "SourceError",
    "filter_reason",
    "fit_chinchilla",
    "fit_curves",
    "fit_form",
    "fit_log_linear",
    "fit_power_law",
    "load_prompt_bank",
    "open_source",
    "read_points",
    "run_recaption",
    "runs_series",
    "shard_of",
]
