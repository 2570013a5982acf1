"""What a dataset prefix holds: counts, token and image statistics, histograms, one sample rendered.

Used by tools/inspect_dataset.py; every function takes an open IndexedMultimodalDataset and returns
plain data (dicts, strings) so the CLI can print text or JSON.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np

from megasail.data.format.reader import (
    IMAGE_FORMAT_NAMES,
    SEGMENT_IMAGE,
    SEGMENT_TARGET,
    IndexedMultimodalDataset,
    image_idx_path,
    read_image_index,
    read_token_index,
    token_idx_path,
)
from megasail.data.images.tiling import num_image_tokens, num_tiles

_EXTENSIONS = {1: "jpg", 2: "png"}


def _distribution(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"count": 0}
    q = np.percentile(values, [50, 90, 99])
    return {
        "count": int(len(values)),
        "min": int(values.min()),
        "mean": round(float(values.mean()), 2),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
        "max": int(values.max()),
        "sum": int(values.sum()),
    }


def length_histogram(lengths: np.ndarray, bins: int = 10) -> list[dict]:
    """Equal-width bins over [min, max]: [{"low", "high", "count"}]."""
    if len(lengths) == 0:
        return []
    counts, edges = np.histogram(lengths, bins=bins)
    return [{"low": int(edges[i]), "high": int(edges[i + 1]), "count": int(c)} for i, c in enumerate(counts)]


def dataset_summary(ds: IndexedMultimodalDataset, max_tiles: int) -> dict:
    """Counts and distributions of a prefix; token counts expand every image at `max_tiles`."""
    ti = read_token_index(token_idx_path(ds.prefix))
    ii = read_image_index(image_idx_path(ds.prefix))
    target = np.where(ti.modes == SEGMENT_TARGET, ti.lengths, 0).astype(np.int64)
    cum_target = np.concatenate([[0], np.cumsum(target)])
    target_per_sample = cum_target[ti.doc_index[1:]] - cum_target[ti.doc_index[:-1]]
    totals = ds.token_counts(max_tiles)
    images_per_sample = np.diff(ii.doc_image_start.astype(np.int64))
    tiles = Counter()
    for (w, h), n in Counter(zip(ii.widths.tolist(), ii.heights.tolist(), strict=True)).items():
        tiles[num_tiles(w, h, max_tiles)] += n
    manifest = ds.manifest or {}
    source_paths = {s["source_id"]: s["path"] for s in manifest.get("sources", [])}
    per_source = Counter(ds.sources.tolist())
    return {
        "prefix": ds.prefix,
        "complete": ds.manifest is not None,
        "samples": len(ds),
        "segments": int(len(ti.lengths)),
        "stored_tokens": ds.num_tokens,
        "images": ds.num_images,
        "image_bytes": int(ii.sizes.sum()) if len(ii.sizes) else 0,
        "image_formats": {
            IMAGE_FORMAT_NAMES.get(k, str(k)): v for k, v in sorted(Counter(ii.formats.tolist()).items())
        },
        "max_tiles": max_tiles,
        "tokens_per_sample": _distribution(totals),
        "text_tokens_per_sample": _distribution(ds.text_token_counts()),
        "target_tokens_per_sample": _distribution(target_per_sample),
        "images_per_sample": _distribution(images_per_sample),
        "image_width": _distribution(ii.widths.astype(np.int64)),
        "image_height": _distribution(ii.heights.astype(np.int64)),
        "tiles_per_image": {str(k): v for k, v in sorted(tiles.items())},
        "length_histogram": length_histogram(totals),
        "sources": [
            {"source_id": int(k), "path": source_paths.get(int(k), "?"), "samples": v}
            for k, v in sorted(per_source.items())
        ],
        "rejected_by_reason": manifest.get("rejected_by_reason", {}),
        "read": manifest.get("counts", {}).get("read"),
        "tokenizer": manifest.get("tokenizer", {}).get("path"),
        "templates": {k: v.get("name") for k, v in manifest.get("templates", {}).items()},
    }


def format_summary(s: dict) -> str:
    """The summary as aligned text with a bar-chart length histogram."""
    lines = [
        f"{s['prefix']}  ({'complete' if s['complete'] else 'INCOMPLETE: no manifest'})",
        f"  samples {s['samples']}, segments {s['segments']}, stored tokens {s['stored_tokens']}, "
        f"images {s['images']} ({s['image_bytes'] / 1e6:.1f} MB; {s['image_formats']})",
    ]
    if s["read"] is not None:
        lines.append(
            f"  read {s['read']}, rejected {sum(s['rejected_by_reason'].values())} "
            f"{dict(s['rejected_by_reason']) or ''}".rstrip()
        )
    if s["tokenizer"]:
        lines.append(f"  tokenizer {s['tokenizer']}; templates {s['templates']}")
    lines.append(f"  distributions (tokens count each image at max_tiles={s['max_tiles']}):")
    for key in (
        "tokens_per_sample",
        "text_tokens_per_sample",
        "target_tokens_per_sample",
        "images_per_sample",
        "image_width",
        "image_height",
    ):
        d = s[key]
        if d["count"]:
            lines.append(
                f"    {key:<26} min {d['min']:>7}  mean {d['mean']:>9.1f}  p50 {d['p50']:>8.0f}  "
                f"p90 {d['p90']:>8.0f}  p99 {d['p99']:>8.0f}  max {d['max']:>7}"
            )
    lines.append(f"  tiles per image: {s['tiles_per_image']}")
    if s["length_histogram"]:
        lines.append("  sample length histogram (tokens):")
        peak = max(b["count"] for b in s["length_histogram"]) or 1
        for b in s["length_histogram"]:
            bar = "#" * max(int(40 * b["count"] / peak), 1 if b["count"] else 0)
            lines.append(f"    {b['low']:>7} - {b['high']:<7} {b['count']:>8}  {bar}")
    lines.append("  sources:")
    for src in s["sources"]:
        lines.append(f"    [{src['source_id']}] {src['samples']:>8} samples  {src['path']}")
    return "\n".join(lines)


def render_sample(
    ds: IndexedMultimodalDataset, index: int, max_tiles: int, tokenizer=None, color: bool = False
) -> str:
    """Sample `index` as text: loss-bearing (target) spans in [[...]] (green with `color`), images as
    `<image k: WxH fmt, N tiles, T tokens>`; token ids instead of text when no tokenizer is given."""
    sample = ds[index]
    out = []
    for mode, tokens in zip(sample.segment_modes.tolist(), sample.segment_tokens, strict=True):
        if mode == SEGMENT_IMAGE:
            ref = sample.images[int(tokens[0])]
            out.append(
                f"<image {int(tokens[0])}: {ref.width}x{ref.height} "
                f"{IMAGE_FORMAT_NAMES.get(ref.format, ref.format)}, "
                f"{num_tiles(ref.width, ref.height, max_tiles)} tiles, "
                f"{num_image_tokens(ref.width, ref.height, max_tiles)} tokens>"
            )
            continue
        text = (
            tokenizer.decode(tokens.tolist())
            if tokenizer is not None
            else " ".join(map(str, tokens.tolist()))
        )
        if mode == SEGMENT_TARGET:
            text = f"\x1b[32m{text}\x1b[0m" if color else f"[[{text}]]"
        out.append(text)
    return "".join(out)


def dump_images(ds: IndexedMultimodalDataset, index: int, directory: str) -> list[str]:
    """Write sample `index`'s images as DIR/sample{index}_image{k}.{jpg,png,bin}; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for k, ref in enumerate(ds[index].images):
        path = os.path.join(directory, f"sample{index}_image{k}.{_EXTENSIONS.get(ref.format, 'bin')}")
        with open(path, "wb") as f:
            f.write(ref.data)
        paths.append(path)
    return paths
