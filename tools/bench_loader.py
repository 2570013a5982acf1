"""Benchmark the training data loader: packing efficiency, loader overhead over decode, DP balance.

    python tools/bench_loader.py            # full run (a few minutes on 2 cores)
    python tools/bench_loader.py --quick    # smoke run (tests call it)

Tables (markdown):
1. Packing efficiency (trained tokens / token slots) at sequence lengths 4096 and 8192 on a
   SAIL-VL-like length mix (`realistic_length_mix`): the packer over whole epochs and per loader
   chunk (what the loader does, chunks of --chunk-samples).
2. Loader vs decode alone: samples/s of the whole loader (index plan, read, expand, decode,
   replacement checks, collation) against `decode_tiles` on the same images in one process; the
   difference is the loader's own overhead.
3. DP cost imbalance at DP 8: slowest rank's estimated cost / mean, per global batch, with
   contiguous assignment and with LPT balancing (SAIL-VL-2B FLOPs).
4. Loader start-up on one text-only source of --startup-entries index entries (1M; --large adds
   100M): each in a fresh process, the time to build MultimodalDataLoader and to its first
   micro-batch, and the peak RSS (VmHWM) with what stays resident (anonymous memory vs mapped
   index pages); beside it the same for the curriculum's open_source alone (its length check reads
   the index in blocks; nothing per sample is kept). The prefix is written array by array
   (`write_synthetic_text_prefix`, bounded memory) with a sparse token file, since start-up reads
   only the index.
5. Worker start: time to the first micro-batch with 2 workers started by fork and by spawn (the
   start method GPU decoding in workers needs); skipped by --quick.
6. Validation: seconds per evaluation of a stage's validation data (a few global batches), reusing
   one ValidationReader (plan made once, persistent workers, reset()) against building a new one for
   every evaluation (opening and planning again, starting workers), with 0 workers and 2 forked or
   spawned ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import islice

import numpy as np

from megasail.data.format import index_helpers
from megasail.data.images.tiling import IMAGE_WRAPPER_TOKENS, TOKENS_PER_TILE
from megasail.data.loader.balance import SequenceCostModel, assign_to_ranks, imbalance
from megasail.data.loader.curriculum import PlannedSequence

# (share, text tokens lo..hi, images lo..hi, tiles per image lo..hi): SAIL-VL's data kinds
LENGTH_MIX = {
    "caption": (0.45, (15, 160), (1, 1), (1, 7)),
    "ocr_document": (0.15, (100, 1500), (1, 1), (4, 13)),
    "sft_single_image": (0.25, (40, 1200), (1, 1), (1, 7)),
    "multi_image": (0.05, (60, 600), (2, 4), (1, 3)),
    "text_only": (0.10, (50, 3000), (0, 0), (1, 1)),
}


def realistic_length_mix(
    n: int, seed: int = 0, max_length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int64[n], tiles int64[n]) of samples drawn from LENGTH_MIX (text log-uniform).

    Samples longer than max_length are redrawn (preprocessing caps sample length the same way).
    """
    rng = np.random.default_rng(seed)
    kinds = list(LENGTH_MIX.values())
    shares = np.array([k[0] for k in kinds])
    tokens, tiles = [], []
    while len(tokens) < n:
        share, (t_lo, t_hi), (i_lo, i_hi), (tile_lo, tile_hi) = kinds[
            rng.choice(len(kinds), p=shares / shares.sum())
        ]
        text = int(np.exp(rng.uniform(np.log(t_lo), np.log(t_hi))))
        per_image = rng.integers(tile_lo, tile_hi + 1, size=int(rng.integers(i_lo, i_hi + 1)))
        length = text + int(np.sum(per_image * TOKENS_PER_TILE + IMAGE_WRAPPER_TOKENS))
        if max_length is not None and length > max_length:
            continue
        tokens.append(length)
        tiles.append(int(per_image.sum()))
    return np.array(tokens, dtype=np.int64), np.array(tiles, dtype=np.int64)


def packing_table(num_samples: int, chunk_samples: int) -> list[str]:
    from megasail.data.loader.packing import pack_samples, packing_efficiency

    rows = [
        f"| seq_length | samples | sequences | efficiency (whole) | efficiency (chunks of {chunk_samples}) "
        "| pack time (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for seq_length in (4096, 8192):
        lengths, _ = realistic_length_mix(num_samples, seed=1, max_length=seq_length)
        started = time.perf_counter()
        groups = pack_samples(lengths, seq_length, seed=3)
        seconds = time.perf_counter() - started
        chunk_groups = []
        for start in range(0, num_samples, chunk_samples):
            part = pack_samples(lengths[start : start + chunk_samples], seq_length, seed=start)
            chunk_groups += part
        rows.append(
            f"| {seq_length} | {num_samples} | {len(groups)} | {packing_efficiency(lengths, groups, seq_length):.4f} "
            f"| {packing_efficiency(lengths, chunk_groups, seq_length):.4f} | {seconds:.3f} |"
        )
    return rows


def imbalance_table(num_samples: int, global_batch: int, dp_size: int = 8) -> list[str]:
    from megasail.data.loader.packing import pack_samples

    seq_length = 8192
    lengths, tiles = realistic_length_mix(num_samples, seed=2, max_length=seq_length)
    groups = pack_samples(lengths, seq_length, seed=5)
    # global batches take rows in the planner's order: a seeded shuffle of the packed rows, not the
    # packer's longest-first opening order (which puts look-alike rows in one global batch)
    groups = [groups[i] for i in index_helpers.shuffle_indices(len(groups), 6).tolist()]
    sequences = [
        PlannedSequence(
            0,
            0,
            p,
            tuple([0] * len(g)),
            tuple(g.tolist()),
            tuple(lengths[g].tolist()),
            tuple(tiles[g].tolist()),
        )
        for p, g in enumerate(groups)
    ]
    cost_model = SequenceCostModel.from_preset("sail_vl_2b")
    results = {False: [], True: []}
    tile_results = {False: [], True: []}  # the ViT's share alone: tiles per rank, max / mean
    for start in range(0, len(sequences) - global_batch + 1, global_batch):
        batch = sequences[start : start + global_batch]
        costs = cost_model.costs(batch, seq_length)
        batch_tiles = np.array([s.num_tiles for s in batch], dtype=np.float64)
        for balance in (False, True):
            ranks = assign_to_ranks(costs, dp_size, balance=balance)
            results[balance].append(imbalance(costs, ranks))
            tile_results[balance].append(imbalance(batch_tiles, ranks))
    rows = [
        f"| assignment (DP {dp_size}, global batch {global_batch} x {seq_length}) | global batches "
        "| cost max/mean (mean) | cost max/mean (worst) | ViT tiles max/mean (mean) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for balance, name in ((False, "contiguous (megatron default)"), (True, "LPT by estimated FLOPs")):
        values = np.array(results[balance])
        rows.append(
            f"| {name} | {len(values)} | {values.mean():.4f} | {values.max():.4f} "
            f"| {np.mean(tile_results[balance]):.4f} |"
        )
    return rows


def worker_start_table(num_samples: int, repeats: int, workers: int = 2) -> list[str]:
    """Time to the first micro-batch with `workers` DataLoader workers started by fork and by spawn
    (spawn is what a GPU decoding in workers needs: each worker then owns its DALI pipeline)."""
    from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
    from megasail.data.loader.data_loader import MultimodalDataLoader

    rows = ["| worker start | workers | first micro-batch s (median) | later micro-batch s (median) |",
            "| --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as root:
        prefix = os.path.join(root, "bench")
        write_bench_prefix(prefix, num_samples)
        times = {"fork": [], "spawn": []}
        for _ in range(repeats):
            for start in times:  # alternating, so load changes hit both
                config = DataConfig(stages=[StageConfig("bench", [SourceConfig(prefix)])], seq_length=8192,
                                    global_batch_size=2, micro_batch_size=1, max_tiles=6, num_workers=workers,
                                    decode_backend="pil", worker_start=start)
                loader = MultimodalDataLoader(config)
                started = time.perf_counter()
                next(loader)
                first = time.perf_counter() - started
                started = time.perf_counter()
                next(loader)
                times[start].append((first, time.perf_counter() - started))
                loader.close()
        for start, values in times.items():
            first, later = (float(np.median(v)) for v in zip(*values, strict=True))
            rows.append(f"| {start} | {workers} | {first:.2f} | {later:.2f} |")
    return rows


def validation_table(num_samples: int, eval_iters: int, repeats: int, settings: list[tuple[int, str]]) -> list[str]:
    """Seconds per evaluation, reuse (reset) vs rebuild (a new ValidationReader), per (workers, start)."""
    from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
    from megasail.data.loader.validation import ValidationReader

    def evaluate(reader) -> int:
        reader.reset()
        steps = 0
        while True:
            try:
                reader.next_step()
                steps += 1
            except StopIteration:
                return steps

    rows = ["| workers | start | reuse s / evaluation (median) | rebuild s / evaluation (median) | rebuild / reuse |",
            "| --- | --- | --- | --- | --- |"]
    with tempfile.TemporaryDirectory() as root:
        prefix = os.path.join(root, "held_out")
        write_bench_prefix(prefix, num_samples)
        for workers, start in settings:
            config = DataConfig(
                stages=[StageConfig("bench", [SourceConfig(prefix)], validation_sources=[SourceConfig(prefix)])],
                seq_length=8192, global_batch_size=2, micro_batch_size=1, max_tiles=6, num_workers=workers,
                decode_backend="pil", worker_start=start)
            kept = ValidationReader(config, 0, eval_iters)
            evaluate(kept)  # the first evaluation starts the workers in both cases
            reuse, rebuild = [], []
            for _ in range(repeats):  # alternating, so load changes hit both
                started = time.perf_counter()
                evaluate(kept)
                reuse.append(time.perf_counter() - started)
                started = time.perf_counter()
                fresh = ValidationReader(config, 0, eval_iters)
                evaluate(fresh)
                fresh.close()
                rebuild.append(time.perf_counter() - started)
            kept.close()
            a, b = float(np.median(reuse)), float(np.median(rebuild))
            rows.append(f"| {workers} | {start if workers else '-'} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    return rows


def write_bench_prefix(prefix: str, num_samples: int, seed: int = 0) -> None:
    """Photo-like JPEGs (one per caption-like sample, every 4th sample text-only)."""
    import io

    from PIL import Image

    from megasail.data.format.writer import ShardWriter

    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (800, 600), (1024, 768), (480, 640)]
    with ShardWriter(prefix) as writer:
        for i in range(num_samples):
            text = rng.integers(1, 150000, size=int(rng.integers(20, 300))).tolist()
            if i % 4 == 3:
                writer.add_sample(text, [len(text)], [1])
                continue
            width, height = sizes[i % len(sizes)]
            y, x = np.mgrid[0:height, 0:width]
            pixels = np.stack([(x * (i % 7 + 1)) % 256, (y * 3) % 256, (x + y + 17 * i) % 256], -1)
            pixels = (pixels + rng.integers(0, 24, size=pixels.shape)).clip(0, 255).astype(np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="JPEG", quality=85)
            writer.add_sample([0] + text, [1, len(text)], [2, 1], [out.getvalue()], [width], [height])
    with open(f"{prefix}.manifest.json", "w") as f:
        json.dump(
            {
                "format_version": 1,
                "image_token_ids": {"img_start": 151665, "img_end": 151666, "img_context": 151667},
            },
            f,
        )


def throughput_table(
    num_samples: int, global_batches: int, workers: list[int], backend: str, repeats: int
) -> list[str]:
    """Median over `repeats` alternating runs: decode alone, then the loader at each worker count.

    The loader is read a global batch at a time (`next_step`), each step's batches dropped before
    the next, as the training loop does. Wall seconds for all; for the in-process runs (decode
    alone, workers=0) also process CPU seconds, which a shared machine disturbs less.
    """
    from megasail.data.format.reader import IndexedMultimodalDataset
    from megasail.data.images.decode import decode_tiles
    from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
    from megasail.data.loader.data_loader import MultimodalDataLoader, micro_batch_plans

    rows = [
        "| pipeline | decode backend | workers | samples | images | wall s | samples/s | CPU s "
        "| overhead vs decode alone (wall / CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as root:
        prefix = os.path.join(root, "bench")
        write_bench_prefix(prefix, num_samples)

        def config(num_workers):
            return DataConfig(
                stages=[StageConfig("bench", [SourceConfig(prefix)])],
                seq_length=8192,
                global_batch_size=2,
                micro_batch_size=1,
                max_tiles=6,
                num_workers=num_workers,
                decode_backend=backend,
                pack_chunk_samples=4096,
            )

        # what the loader will read: the planned samples of the first global batches, in order
        probe = MultimodalDataLoader(config(0))
        micro_batches = global_batches * 2
        plans = micro_batch_plans(probe.curriculum, probe.position, 0, 1, probe.cost_model)
        planned = [
            (k, i)
            for plan in islice(plans, micro_batches)
            for s in plan.sequences
            for k, i in zip(s.sources, s.samples, strict=True)
        ]
        ds = IndexedMultimodalDataset(prefix)
        images = [bytes(im.data) for _, i in planned for im in ds[i].images]
        timings = {"decode": [], **{w: [] for w in workers}}
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            for i in range(0, len(images), 8):  # decode alone, batched like a micro-batch's images
                decode_tiles(images[i : i + 8], 6, backend=backend)
            timings["decode"].append((time.perf_counter() - wall, time.process_time() - cpu))
            for num_workers in workers:
                loader = MultimodalDataLoader(config(num_workers))
                wall, cpu = time.perf_counter(), time.process_time()
                fetched = 0
                for _ in range(global_batches):  # as the trainer does: a step's micro-batches, used, dropped
                    fetched += len(loader.next_step())
                timings[num_workers].append((time.perf_counter() - wall, time.process_time() - cpu))
                stats = loader.statistics()
                loader.close()
                assert stats["samples"] == len(planned) and fetched == micro_batches
        decode_wall, decode_cpu = (float(np.median(x)) for x in zip(*timings["decode"], strict=True))
        rows.append(
            f"| decode_tiles alone | {backend} | 0 | {len(planned)} | {len(images)} | {decode_wall:.2f} "
            f"| {len(planned) / decode_wall:.1f} | {decode_cpu:.2f} | - |"
        )
        for num_workers in workers:
            wall, cpu = (float(np.median(x)) for x in zip(*timings[num_workers], strict=True))
            cpu_cell = f"{cpu:.2f}" if num_workers == 0 else "(in workers)"
            cpu_overhead = f" / {cpu / decode_cpu - 1:+.1%}" if num_workers == 0 else ""
            rows.append(
                f"| whole loader | {backend} | {num_workers} | {len(planned)} | {len(images)} | {wall:.2f} "
                f"| {len(planned) / wall:.1f} | {cpu_cell} | {wall / decode_wall - 1:+.1%}{cpu_overhead} |"
            )
    return rows


def write_synthetic_text_prefix(prefix: str, num_samples: int, seed: int = 0, chunk: int = 1 << 22) -> int:
    """A text-only prefix of `num_samples` samples, each one TARGET segment of 16..1024 tokens,
    written section by section in chunks of `chunk` samples (memory bounded whatever num_samples).
    PREFIX.bin is a sparse file of zero tokens (nothing on disk): only the index is real. Returns
    the token count. The bytes equal `write_text_prefix` given the same lengths and zero tokens."""
    from megasail.data.format.reader import (
        IMAGE_INDEX_MAGIC,
        IMAGE_INDEX_VERSION,
        SEGMENT_TARGET,
        TOKEN_DTYPE_CODE,
        TOKEN_INDEX_MAGIC,
        TOKEN_INDEX_VERSION,
    )

    starts = range(0, num_samples, chunk)

    def lengths(start: int) -> np.ndarray:  # the same chunk every time it is asked for
        rng = np.random.default_rng([seed, start])
        return rng.integers(16, 1025, min(chunk, num_samples - start)).astype(np.int32)

    with open(prefix + ".idx", "wb") as f:
        f.write(
            TOKEN_INDEX_MAGIC + np.array([TOKEN_INDEX_VERSION], "<u8").tobytes() + bytes([TOKEN_DTYPE_CODE])
        )
        f.write(np.array([num_samples, num_samples + 1], "<u8").tobytes())  # S segments, D + 1 entries
        for start in starts:
            f.write(lengths(start).tobytes())
        pointer = 0
        for start in starts:
            sizes = lengths(start).astype(np.int64) * 4
            f.write((pointer + np.cumsum(sizes) - sizes).tobytes())
            pointer += int(sizes.sum())
        f.write(np.zeros(1, np.int64).tobytes())
        for start in starts:  # one segment per sample: document d ends at segment d + 1
            f.write(
                np.arange(start + 1, start + 1 + min(chunk, num_samples - start), dtype=np.int64).tobytes()
            )
        for start in starts:
            f.write(np.full(min(chunk, num_samples - start), SEGMENT_TARGET, np.int8).tobytes())
    with open(prefix + ".img.idx", "wb") as f:  # no images: only per-sample ranges (all 0) and sources
        f.write(IMAGE_INDEX_MAGIC + np.array([IMAGE_INDEX_VERSION, 0, num_samples], "<u8").tobytes())
        zeros = bytes(8 * min(chunk, num_samples + 1))
        for start in range(0, num_samples + 1, chunk):  # u64 doc_image_start[D + 1]
            f.write(zeros[: 8 * min(chunk, num_samples + 1 - start)])
        for start in starts:  # u32 doc_source[D]
            f.write(zeros[: 4 * min(chunk, num_samples - start)])
        f.write(bytes((8 - num_samples * 4 % 8) % 8))  # every array of the image index is 8-byte aligned
    with open(prefix + ".bin", "wb") as f:
        f.truncate(pointer)  # sparse: the loader reads only the tokens of the batches it builds
    open(prefix + ".img.bin", "wb").close()
    with open(prefix + ".manifest.json", "w") as f:
        json.dump(
            {
                "format_version": 1,
                "image_token_ids": {"img_start": 151665, "img_end": 151666, "img_context": 151667},
            },
            f,
        )
    return pointer // 4


# Each measurement runs in a fresh interpreter: VmHWM is then the high-water mark of that start-up
# alone (ru_maxrss would carry the spawning process's peak across exec).
_STARTUP_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
from megasail.data.loader.curriculum import open_source
from megasail.data.loader.data_loader import MultimodalDataLoader

def status():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon", "RssFile")}

prefix, what = sys.argv[1], sys.argv[2]
config = DataConfig(stages=[StageConfig("bench", [SourceConfig(prefix)])], seq_length=8192, global_batch_size=8,
                    micro_batch_size=1, max_tiles=6, num_workers=0, decode_backend="pil")
before = status()
t1 = time.perf_counter()
out = {"import_s": t1 - t0, "hwm_before_mb": before["VmHWM"]}
if what == "loader":
    loader = MultimodalDataLoader(config)
    t2 = time.perf_counter()
    batch = next(loader)
    t3 = time.perf_counter()
    out.update(construct_s=t2 - t1, first_batch_s=t3 - t2)
else:
    source = open_source(config.stages[0].sources[0], config)
    out.update(open_source_s=time.perf_counter() - t1)
after = status()
out.update(peak_rss_mb=after["VmHWM"], rss_anon_mb=after["RssAnon"], rss_file_mb=after["RssFile"])
print(json.dumps(out))
"""


def _startup_child(prefix: str, what: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _STARTUP_CHILD, prefix, what], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"start-up measurement ({what}) on {prefix} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def startup_table(sizes: list[int], root: str | None = None, attribute: bool = True) -> list[str]:
    """One row per size: write the prefix, then measure the whole loader and (attribute) open_source alone."""
    rows = [
        "| index entries | prefix write s | loader built s | first micro-batch s | peak RSS MB (after imports) "
        "| resident anon / mapped MB | open_source s | open_source peak above imports MB (B per entry) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory(dir=root) as work:
        for n in sizes:
            prefix = os.path.join(work, f"text_{n}")
            started = time.perf_counter()
            write_synthetic_text_prefix(prefix, n)
            written = time.perf_counter() - started
            loader = _startup_child(prefix, "loader")
            alone_cells = "- | -"
            if attribute:
                alone = _startup_child(prefix, "open_source")
                above = alone["peak_rss_mb"] - alone["hwm_before_mb"]
                alone_cells = f"{alone['open_source_s']:.2f} | {above:.0f} ({above * 2**20 / n:.0f})"
            rows.append(
                f"| {n:,} | {written:.1f} | {loader['construct_s']:.2f} | {loader['first_batch_s']:.2f} "
                f"| {loader['peak_rss_mb']:.0f} ({loader['hwm_before_mb']:.0f}) "
                f"| {loader['rss_anon_mb']:.0f} / {loader['rss_file_mb']:.0f} | {alone_cells} |"
            )
            for suffix in (".bin", ".idx", ".img.bin", ".img.idx", ".manifest.json"):
                os.remove(prefix + suffix)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, one worker setting")
    parser.add_argument(
        "--packing-samples", type=int, default=200_000, help="samples in the packing benchmark"
    )
    parser.add_argument(
        "--chunk-samples", type=int, default=65536, help="loader chunk (DataConfig.pack_chunk_samples)"
    )
    parser.add_argument(
        "--global-batch", type=int, default=256, help="sequences per global batch (DP balance)"
    )
    parser.add_argument(
        "--loader-samples", type=int, default=400, help="samples in the loader throughput prefix"
    )
    parser.add_argument(
        "--global-batches", type=int, default=8, help="global batches (2 x 8192) the loader runs"
    )
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts to time")
    parser.add_argument(
        "--backend", default="pil", choices=("pil", "dali", "auto"), help="image decode backend"
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternating timing runs (medians reported)")
    parser.add_argument(
        "--startup-entries",
        type=int,
        nargs="+",
        default=[1_000_000],
        help="index entries (text-only samples) of the sources whose loader start-up is measured",
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help="also measure start-up on 100M index entries (about 3.3 GB of index on disk, minutes)",
    )
    parser.add_argument(
        "--workdir", default=None, help="directory for the start-up prefixes (default: the temp dir)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.packing_samples, args.chunk_samples, args.global_batch = 20_000, 8192, 64
        args.loader_samples, args.global_batches, args.workers, args.repeats = 40, 1, "0", 1
        args.startup_entries = [100_000]
    if args.large:
        args.startup_entries = [*args.startup_entries, 100_000_000]
    workers = [int(w) for w in args.workers.split(",")]
    print("## Packing efficiency\n")
    print("\n".join(packing_table(args.packing_samples, args.chunk_samples)))
    print("\n## DP cost imbalance\n")
    print("\n".join(imbalance_table(args.packing_samples, args.global_batch)))
    print("\n## Loader vs decode alone\n")
    print(
        "\n".join(
            throughput_table(args.loader_samples, args.global_batches, workers, args.backend, args.repeats)
        )
    )
    if not args.quick:
        print("\n## Worker start (fork vs spawn)\n")
        print("\n".join(worker_start_table(args.loader_samples, args.repeats)))
    print("\n## Validation: reuse vs rebuild per evaluation\n")
    settings = [(0, "fork")] if args.quick else [(0, "fork"), (2, "fork"), (2, "spawn")]
    print("\n".join(validation_table(24 if args.quick else 48, 2, args.repeats, settings)))
    print("\n## Loader start-up\n")
    print("\n".join(startup_table(args.startup_entries, args.workdir, attribute=not args.quick)))


if __name__ == "__main__":
    main()
