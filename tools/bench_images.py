"""Benchmark image decode + InternVL tiling: PIL vs DALI vs auto, side by side in one run.

Synthetic but realistic inputs: photo-sized (640x480) images of smooth gradients, noise and
strokes, and A4 scans (2480x3508 at 300 dpi) of text-like strokes on paper, each as JPEG and PNG.
For every (image class, max_tiles) the backends run in alternating order over several windows;
the table reports medians of images/s and tiles/s (wall clock) and tiles per CPU-second
("per core": process CPU time over all threads, which holds up better than wall time on a
shared machine). With CUDA visible to DALI, the `dali` and `auto` rows run DALI `mixed`.

    python tools/bench_images.py                 # full table
    python tools/bench_images.py --quick         # smoke run (small documents, one window)
    python tools/bench_images.py --sweep-sizes   # PIL vs DALI per core by image size (auto's crossover)
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from megasail.data.images.dali import dali_available
from megasail.data.images.decode import AUTO_DALI_MIN_PIXELS, DecodeStats, decode_tiles
from megasail.data.images.tiling import tile_grid

PHOTO_SIZE = (640, 480)
DOCUMENT_SIZE = (2480, 3508)  # A4 at 300 dpi


def synthetic_photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Smooth colour gradients + sensor-like noise + a few strokes: compresses like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 3, 2).tolist() + [rng.uniform(0, 6.28)]
        channels.append(128 + 90 * np.sin(2 * np.pi * fx * x / width + phase) * np.cos(2 * np.pi * fy * y / height))
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 8, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(20):
        points = [tuple(p) for p in rng.integers(0, [width, height], (4, 2)).tolist()]
        draw.line(points, fill=tuple(rng.integers(0, 256, 3).tolist()), width=int(rng.integers(1, 6)))
    return image


def synthetic_document(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Off-white paper with scanner noise and lines of text-like dark strokes."""
    paper = 240 + rng.normal(0, 4, (height, width, 1)) + np.zeros((1, 1, 3))
    image = Image.fromarray(np.clip(paper, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    glyph = max(4, height // 180)  # ~12 pt text at 300 dpi is ~50 px per line
    margin = width // 10
    for top in range(height // 12, height - height // 12, int(glyph * 2.6)):
        x = margin
        while x < width - margin:
            word = int(rng.integers(2, 10))
            for _ in range(word):  # a glyph: two or three short strokes
                for _ in range(int(rng.integers(2, 4))):
                    x0, y0 = x + rng.integers(0, glyph), top + rng.integers(0, glyph * 2)
                    draw.line([(x0, y0), (x0 + rng.integers(-glyph, glyph), y0 + rng.integers(-glyph, glyph))],
                              fill=(30, 30, 40), width=max(1, glyph // 5))
                x += glyph
            x += glyph * 2
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@dataclass
class Row:
    images: str
    size: str
    max_tiles: int
    backend: str  # the requested backend, with what actually ran in brackets
    tiles_per_image: float
    images_per_s: float
    tiles_per_s: float
    tiles_per_cpu_s: float  # tiles per second of process CPU time: the per-core rate
    speed_vs_best: float  # median over windows of tiles per CPU-second / the best backend's in that window


def measure(batch: list[bytes], max_tiles: int, backend: str, dali_threads: int) -> tuple[float, float, int, str]:
    """One timed decode of the batch: (wall s, CPU s, tiles, backends that ran)."""
    stats = DecodeStats()
    wall, cpu = time.perf_counter(), time.process_time()
    decode_tiles(batch, max_tiles, backend=backend, on_error="raise", stats=stats, dali_threads=dali_threads)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, stats.tiles, "+".join(sorted(stats.backend_counts))


def bench_class(name: str, batch: list[bytes], size: tuple[int, int], max_tiles: int, backends: list[str],
                windows: int, dali_threads: int, warmup: bool = True) -> list[Row]:
    """Side-by-side medians of `windows` timed batches per backend, backends alternating each window."""
    samples: dict[str, list[tuple[float, float, int]]] = {b: [] for b in backends}
    ran: dict[str, str] = {}
    for backend in backends if warmup else []:  # builds DALI pipelines, fills caches
        measure(batch, max_tiles, backend, dali_threads)
    for window in range(windows):
        order = backends if window % 2 == 0 else backends[::-1]
        for backend in order:
            wall, cpu, tiles, ran[backend] = measure(batch, max_tiles, backend, dali_threads)
            samples[backend].append((wall, max(cpu, 1e-9), tiles))
    # Speed relative to the best backend of the same window, then the median over windows: the
    # load other processes put on the machine drifts slowly, so same-window ratios are steadier.
    per_window_best = [max(s[window][2] / s[window][1] for s in samples.values()) for window in range(windows)]
    rows = []
    for backend in backends:
        wall = statistics.median(s[0] for s in samples[backend])
        cpu = statistics.median(s[1] for s in samples[backend])
        tiles = samples[backend][0][2]
        vs_best = statistics.median(s[2] / s[1] / best for s, best in zip(samples[backend], per_window_best, strict=True))
        rows.append(Row(name, f"{size[0]}x{size[1]}", max_tiles, f"{backend} ({ran[backend]})", tiles / len(batch),
                        len(batch) / wall, tiles / wall, tiles / cpu, vs_best))
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = ["| images | size | max tiles | backend | tiles/image | images/s | tiles/s | tiles/s per core | vs best |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.images} | {r.size} | {r.max_tiles} | {r.backend} | {r.tiles_per_image:.0f} | "
                     f"{r.images_per_s:.1f} | {r.tiles_per_s:.1f} | {r.tiles_per_cpu_s:.1f} | {r.speed_vs_best:.2f} |")
    return "\n".join(lines)


def size_sweep(windows: int, dali_threads: int, rng: np.random.Generator) -> list[Row]:
    """PIL vs DALI per core by image size, max_tiles 6: photo and document content, JPEG and PNG."""
    rows = []
    for megapixels in (0.3, 1.0, 2.0, 4.0, 8.7):
        width = int((megapixels * 1e6 * 0.75) ** 0.5 / 0.75)
        height = int(width * 0.75)
        for content, make in (("photo", synthetic_photo), ("document", synthetic_document)):
            image = make(width, height, rng)
            for fmt in ("JPEG", "PNG"):
                rows += bench_class(f"sweep {content} {fmt}", [encode(image, fmt)], (width, height), 6,
                                    ["pil", "dali"], windows, dali_threads)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: A4 at 100 dpi, 1 window, 1 image per batch, no warm-up")
    parser.add_argument("--max-tiles", default="1,6,12", help="comma-separated max_tiles values")
    parser.add_argument("--backends", default="pil,dali,auto", help="comma-separated backends to compare")
    parser.add_argument("--windows", type=int, default=5, help="timed batches per backend and class (medians)")
    parser.add_argument("--batch", type=int, default=4, help="images per decode_tiles call")
    parser.add_argument("--dali-threads", type=int, default=1, help="DALI CPU worker threads")
    parser.add_argument("--sweep-sizes", action="store_true", help="also time PIL vs DALI over image sizes")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)  # as in a DataLoader worker: one core per decoding process

    windows, batch_size, doc_size = (1, 1, (827, 1170)) if args.quick else (args.windows, args.batch, DOCUMENT_SIZE)
    backends = args.backends.split(",")
    if not dali_available() and "dali" in backends:
        print("nvidia-dali is not installed: leaving out the dali backend (auto runs PIL)")
        backends.remove("dali")
    rng = np.random.default_rng(args.seed)
    classes = []
    for kind, size, make in (("photo", PHOTO_SIZE, synthetic_photo), ("document", doc_size, synthetic_document)):
        sources = [make(*size, rng) for _ in range(min(batch_size, 2))]  # two distinct images, repeated
        for fmt in ("JPEG", "PNG"):
            encoded = [encode(image, fmt) for image in sources]
            classes.append((f"{kind} {fmt}", size, [encoded[i % len(encoded)] for i in range(batch_size)]))

    rows = []
    for name, size, batch in classes:
        for max_tiles in (int(m) for m in args.max_tiles.split(",")):
            rows += bench_class(name, batch, size, max_tiles, backends, windows, args.dali_threads,
                                warmup=not args.quick)
    print(f"\nauto on CPU: DALI from {AUTO_DALI_MIN_PIXELS} pixels, else PIL; "
          f"A4 grid at max 12: {tile_grid(*DOCUMENT_SIZE, 12)}\n")
    print(markdown_table(rows))
    if args.sweep_sizes:
        rows += (sweep := size_sweep(windows, args.dali_threads, rng))
        print("\n" + markdown_table(sweep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
