"""Caption quality filters: each caption is kept or gets exactly one reason, in the order of FILTER_REASONS.

Lengths are in generated tokens (the stop token not counted). Repetition is measured on words, with
each CJK character a word of its own (CJK text has no spaces), so a caption that loops on a phrase
is caught in any script.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

# reason -> what it means (the closing summary and docs/curation.md list them in this order)
FILTER_REASONS: dict[str, str] = {
    "empty": "the caption is empty or whitespace only",
    "repetition": "a word n-gram repeats more than --max-ngram-repeats times (a looping caption)",
    "refusal": "the caption refuses or apologises instead of describing (a refusal phrase)",
    "truncated": "generation stopped at --max-new-tokens, not on a stop token",
    "too_short": "fewer tokens than --min-caption-tokens (or the prompt's min_tokens)",
    "too_long": "more tokens than --max-caption-tokens (or the prompt's max_tokens)",
}

DEFAULT_REFUSALS = (
    "i'm sorry",
    "i am sorry",
    "i apologize",
    "as an ai",
    "i cannot",
    "i can't",
    "i'm unable to",
    "i am unable to",
    "i'm not able to",
    "i am not able to",
    "unable to view",
    "cannot see the image",
    "can't see the image",
    "no image provided",
    "there is no image",
)

_WORDS = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\s\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+")


@dataclass
class FilterConfig:
    min_tokens: int = 8
    max_tokens: int | None = None  # None: only --max-new-tokens bounds a caption (see "truncated")
    ngram: int = 4
    max_ngram_repeats: int = 3
    refusals: tuple[str, ...] = DEFAULT_REFUSALS


def words(text: str) -> list[str]:
    """Lower-cased words with trailing punctuation stripped; CJK characters one word each."""
    out = []
    for w in _WORDS.findall(text.lower()):
        w = w.strip(".,;:!?\"'()[]")
        if w:
            out.append(w)
    return out


def max_ngram_count(text: str, n: int) -> int:
    """How often the most frequent word n-gram of ``text`` occurs (0 when it has fewer than n words)."""
    w = words(text)
    if len(w) < n:
        return 0
    return max(Counter(tuple(w[i : i + n]) for i in range(len(w) - n + 1)).values())


def filter_reason(
    text: str,
    num_tokens: int,
    stopped: bool,
    config: FilterConfig,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
) -> str | None:
    """The first reason of FILTER_REASONS that applies to a caption, or None to keep it.

    ``num_tokens``: generated tokens without the stop token; ``stopped``: ended on a stop token;
    ``min_tokens`` / ``max_tokens``: the prompt's own bounds, replacing the config's when given.
    """
    if not text.strip():
        return "empty"
    if max_ngram_count(text, config.ngram) > config.max_ngram_repeats:
        return "repetition"
    lowered = text.lower().replace("\u2019", "'")
    if any(phrase in lowered for phrase in config.refusals):
        return "refusal"
    if not stopped:
        return "truncated"
    low = config.min_tokens if min_tokens is None else min_tokens
    if num_tokens < low:
        return "too_short"
    high = config.max_tokens if max_tokens is None else max_tokens
    if high is not None and num_tokens > high:
        return "too_long"
    return None
