"""The prompt bank: which question each image is captioned with.

A bank is a YAML or JSON list of ``{id, text, weight}`` entries, with optional per-prompt caption
length bounds ``min_tokens`` / ``max_tokens`` (a short-caption prompt wants fewer tokens than a
detailed one). Each image's prompt is drawn from its id and ``--seed`` (``split.unit_draw``) with
probability weight / sum of weights, so the same image gets the same prompt on any rank, in any
order and after a resume.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass

from megasail.curation.split import unit_draw


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    weight: float = 1.0
    min_tokens: int | None = None  # overrides the run's --min-caption-tokens for this prompt
    max_tokens: int | None = None  # overrides --max-caption-tokens


DEFAULT_PROMPTS = (
    Prompt(
        "detailed",
        "Describe this image in detail: the main subjects, their attributes and positions, the setting, "
        "and any actions or interactions.",
        0.5,
    ),
    Prompt(
        "ocr",
        "Describe this image in detail. Transcribe any visible text exactly as written, and say where it "
        "appears.",
        0.3,
    ),
    Prompt("short", "Write a short caption for this image in one sentence.", 0.2, max_tokens=64),
)


class PromptBankError(ValueError):
    """A bank file that cannot be used; the message names the file and the entry."""


class PromptBank:
    """Weighted prompts; ``choose(image_id)`` is a pure function of (id, seed)."""

    def __init__(self, prompts: tuple[Prompt, ...] | list[Prompt], seed: int = 0, source: str = "defaults"):
        if not prompts:
            raise PromptBankError(f"{source}: the prompt bank is empty")
        ids = [p.id for p in prompts]
        duplicate = next((i for i in ids if ids.count(i) > 1), None)
        if duplicate is not None:
            raise PromptBankError(f"{source}: prompt id {duplicate!r} appears more than once")
        self.prompts = tuple(prompts)
        self.seed = seed
        self.source = source
        total = sum(p.weight for p in prompts)
        running, self._edges = 0.0, []
        for p in prompts:
            running += p.weight / total
            self._edges.append(running)
        self._edges[-1] = 1.0  # rounding must not leave a gap at the top

    def choose(self, image_id: str) -> Prompt:
        index = bisect.bisect_right(self._edges, unit_draw(image_id, self.seed))
        return self.prompts[min(index, len(self.prompts) - 1)]

    def by_id(self, prompt_id: str) -> Prompt:
        return next(p for p in self.prompts if p.id == prompt_id)


def load_prompt_bank(path: str | None, seed: int = 0) -> PromptBank:
    """The bank in ``path`` (YAML or JSON list), or the three default prompts when None."""
    if path is None:
        return PromptBank(DEFAULT_PROMPTS, seed)
    if not os.path.isfile(path):
        raise PromptBankError(f"--prompt-bank {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith(".json"):
            entries = json.loads(text)
        else:
            import yaml

            entries = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml and json raise different types; both mean "unparsable"
        raise PromptBankError(f"{path}: cannot be parsed: {e}") from None
    if not isinstance(entries, list):
        raise PromptBankError(f"{path}: expected a list of {{id, text, weight}} entries, got {type(entries).__name__}")
    prompts = []
    for n, entry in enumerate(entries):
        where = f"{path}: entry {n}"
        if not isinstance(entry, dict):
            raise PromptBankError(f"{where}: expected a mapping with id, text, weight")
        unknown = set(entry) - {"id", "text", "weight", "min_tokens", "max_tokens"}
        if unknown:
            raise PromptBankError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: id, text, weight, "
                                  "min_tokens, max_tokens)")
        if not isinstance(entry.get("id"), str) or not entry["id"]:
            raise PromptBankError(f"{where}: 'id' must be a non-empty string")
        if not isinstance(entry.get("text"), str) or not entry["text"].strip():
            raise PromptBankError(f"{where} ({entry['id']}): 'text' must be a non-empty string")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise PromptBankError(f"{where} ({entry['id']}): 'weight' must be a number > 0, got {weight!r}")
        bounds = {}
        for key in ("min_tokens", "max_tokens"):
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise PromptBankError(f"{where} ({entry['id']}): {key!r} must be an integer >= 0")
            bounds[key] = value
        prompts.append(Prompt(entry["id"], entry["text"], float(weight), **bounds))
    return PromptBank(prompts, seed, source=path)
