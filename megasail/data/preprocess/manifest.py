"""The manifest of a finished prefix: what was written, from what, with which tokenizer, and what was not.

Deterministic by construction (no timestamps, worker counts or timings), so an interrupted and
resumed run, or a run with more workers, produces the same manifest bytes.
"""

from __future__ import annotations

import os
from collections import Counter

from megasail.data.text.template import get_template

FORMAT_NAME = "megasail-indexed-multimodal"
FORMAT_VERSION = 1


def _sum_counts(reports: list[dict]) -> tuple[Counter, Counter]:
    counts, reasons = Counter(), Counter()
    for r in reports:
        counts.update(
            {
                "read": r["read"],
                "written": r["written"],
                "rejected": r["rejected"],
                "internal_errors": len(r.get("internal_errors", [])),
                **r["counts"],
            }
        )
        reasons.update(r["rejected_by_reason"])
    return counts, reasons


def manifest_fingerprint(fingerprint: dict) -> dict:
    """A run's settings fingerprint as the manifest stores it: without the output prefix (the
    manifest's own place), so the same run written under two prefixes has the same manifest."""
    settings = {k: v for k, v in fingerprint["settings"].items() if k != "output_prefix"}
    return {**fingerprint, "settings": settings}


def build_manifest(plan, reports: list[dict]) -> dict:
    """Manifest dict for `plan` (a RunPlan) from its unit reports in unit order."""
    cfg = plan.config
    prefix = os.path.abspath(cfg.output_prefix)
    name = os.path.basename(prefix)
    totals, reasons = _sum_counts(reports)
    sources = []
    for inp in plan.inputs:
        counts, src_reasons = _sum_counts([r for r in reports if r["source_id"] == inp.source_id])
        sources.append(
            {
                "source_id": inp.source_id,
                "path": inp.path,
                "container": inp.container,
                "bytes": inp.size,
                "read": counts["read"],
                "written": counts["written"],
                "rejected": counts["rejected"],
                "internal_errors": counts["internal_errors"],
                "rejected_by_reason": dict(sorted(src_reasons.items())),
            }
        )
    tokenizer = plan.tokenizer
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "files": {
            "tokens": name + ".bin",
            "token_index": name + ".idx",
            "images": name + ".img.bin",
            "image_index": name + ".img.idx",
            "rejects": name + ".rejects.jsonl",
        },
        "tokenizer": tokenizer.identity(),
        "image_token_ids": tokenizer.image_token_ids.as_dict(),
        "templates": {
            "conversation": get_template(cfg.template).describe(),
            "caption": get_template(cfg.caption_template).describe(),
            "text": get_template("text").describe(),
        },
        "system_message": cfg.system_message,
        "input_format": cfg.input_format,
        "max_tiles": cfg.max_tiles,
        "max_seq_length": cfg.max_seq_length,
        "on_too_long": cfg.on_too_long,
        "max_image_pixels": cfg.max_image_pixels,
        "num_samples": totals["written"],
        "num_images": totals["images"],
        "counts": {
            "read": totals["read"],
            "written": totals["written"],
            "rejected": totals["rejected"],
            "internal_errors": totals["internal_errors"],
            "truncated": totals["truncated"],
            "reencoded_images": totals["reencoded_images"],
        },
        "rejected_by_reason": dict(sorted(reasons.items())),
        "tokens": {
            "text": totals["text_tokens"],
            "target": totals["target_tokens"],
            "image_at_max_tiles": totals["image_tokens"],
            "total_at_max_tiles": totals["text_tokens"] + totals["image_tokens"],
        },
        "image_bytes": totals["image_bytes"],
        "sources": sources,
        # What --resume on this finished prefix compares its settings against.
        "fingerprint": manifest_fingerprint(plan.fingerprint),
    }
