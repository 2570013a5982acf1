"""Shard writers (C++ and Python) and merge_shards: bytes on disk, atomicity, validation."""

import os
import struct
import zlib

import numpy as np
import pytest

from megasail.data.format.writer import PyShardWriter, ShardWriter, image_format_code, merge_shards

FILES = (".bin", ".idx", ".img.bin", ".img.idx")
JPEG_HEAD, PNG_HEAD = b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n"


def random_samples(n: int, seed: int = 0) -> list[dict]:
    """Samples as add_sample keyword arguments: 1-6 segments of random modes, images of random bytes."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        modes = rng.integers(0, 3, size=rng.integers(1, 7)).astype(np.int8)
        tokens, lengths, images = [], [], []
        for mode in modes:
            if mode == 2:
                tokens.append([len(images)])
                lengths.append(1)
                head = [JPEG_HEAD, PNG_HEAD, b"RIFF"][rng.integers(0, 3)]
                images.append(head + rng.bytes(int(rng.integers(0, 300))))
            else:
                length = int(rng.integers(0, 40))
                tokens.append(rng.integers(0, 152_000, size=length).tolist())
                lengths.append(length)
        samples.append(
            dict(
                tokens=np.array([t for seg in tokens for t in seg], dtype=np.int32),
                segment_lengths=np.array(lengths, dtype=np.int32),
                segment_modes=modes,
                images=images,
                widths=rng.integers(1, 5000, size=len(images)).astype(np.uint32),
                heights=rng.integers(1, 5000, size=len(images)).astype(np.uint32),
                formats=np.array([image_format_code(im) for im in images], dtype=np.uint8),
                source_id=int(rng.integers(0, 2**32)),
            )
        )
    return samples


def write(writer_cls, prefix, samples):
    with writer_cls(prefix) as writer:
        for sample in samples:
            writer.add_sample(**sample)
    return writer


def read_files(prefix) -> dict[str, bytes]:
    out = {}
    for ext in FILES:
        with open(f"{prefix}{ext}", "rb") as f:
            out[ext] = f.read()
    return out


def test_image_format_code_reads_magic_bytes():
    assert image_format_code(JPEG_HEAD + b"x") == 1
    assert image_format_code(PNG_HEAD) == 2
    assert image_format_code(b"GIF89a") == 3
    assert image_format_code(b"") == 3


@pytest.mark.parametrize("n", [0, 1, 37])
def test_cpp_writer_is_byte_identical_to_python_writer(tmp_path, n):
    samples = random_samples(n, seed=n)
    cpp = write(ShardWriter, tmp_path / "cpp", samples)
    py = write(PyShardWriter, tmp_path / "py", samples)
    assert read_files(tmp_path / "cpp") == read_files(tmp_path / "py")
    for attr in ("num_samples", "num_segments", "num_tokens", "num_images", "image_bytes"):
        assert getattr(cpp, attr) == getattr(py, attr), attr
    assert cpp.num_samples == n
    assert cpp.num_tokens == sum(len(s["tokens"]) for s in samples)
    assert not cpp.is_open and not py.is_open


def parse_image_index(path) -> dict:
    """Independent struct-level parse of PREFIX.img.idx as docs/data_format.md describes it."""
    with open(path, "rb") as f:
        raw = f.read()
    magic, version, m, d = struct.unpack_from("<8sQQQ", raw, 0)
    assert magic == b"MSIMGIDX" and version == 1
    at, out = 32, {}
    for name, fmt, count in [
        ("offsets", "Q", m),
        ("sizes", "Q", m),
        ("doc_image_start", "Q", d + 1),
        ("widths", "I", m),
        ("heights", "I", m),
        ("crc32", "I", m),
        ("doc_source", "I", d),
        ("formats", "B", m),
    ]:
        out[name] = list(struct.unpack_from(f"<{count}{fmt}", raw, at))
        at += -(-struct.calcsize(f"<{count}{fmt}") // 8) * 8
    assert at == len(raw)
    return out


def test_image_index_layout_and_checksums(tmp_path):
    samples = random_samples(20, seed=3)
    write(ShardWriter, tmp_path / "s", samples)
    index = parse_image_index(tmp_path / "s.img.idx")
    images = [im for s in samples for im in s["images"]]
    assert index["sizes"] == [len(im) for im in images]
    assert index["crc32"] == [zlib.crc32(im) for im in images]
    assert index["offsets"] == np.cumsum([0] + index["sizes"][:-1]).tolist()[: len(images)]
    assert index["doc_image_start"] == np.cumsum([0] + [len(s["images"]) for s in samples]).tolist()
    assert index["doc_source"] == [s["source_id"] for s in samples]
    assert index["widths"] == [int(w) for s in samples for w in s["widths"]]
    assert index["formats"] == [int(f) for s in samples for f in s["formats"]]
    with open(tmp_path / "s.img.bin", "rb") as f:
        assert f.read() == b"".join(images)


def test_crc32_matches_zlib_on_long_inputs(tmp_path):
    rng = np.random.default_rng(5)
    images = [rng.bytes(n) for n in (1, 7, 8, 9, 4096 + 3, 100_000)]
    sample = dict(
        tokens=np.arange(len(images), dtype=np.int32),
        segment_lengths=np.ones(len(images), np.int32),
        segment_modes=np.full(len(images), 2, np.int8),
        images=images,
        widths=np.ones(len(images), np.uint32),
        heights=np.ones(len(images), np.uint32),
    )
    write(ShardWriter, tmp_path / "s", [sample])
    assert parse_image_index(tmp_path / "s.img.idx")["crc32"] == [zlib.crc32(im) for im in images]


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_merge_equals_one_writer(tmp_path, backend):
    samples = random_samples(30, seed=11)
    cuts = [(0, 12), (12, 12), (12, 30)]  # the middle shard is empty
    prefixes = []
    for k, (a, b) in enumerate(cuts):
        prefixes.append(str(tmp_path / f"shard_{k}"))
        write(ShardWriter if k % 2 else PyShardWriter, prefixes[-1], samples[a:b])
    write(ShardWriter, tmp_path / "whole", samples)
    assert merge_shards(prefixes, tmp_path / "merged", backend=backend) == 30
    assert read_files(tmp_path / "merged") == read_files(tmp_path / "whole")
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_merge_refuses_its_own_input_and_corrupt_shards(tmp_path, backend):
    write(ShardWriter, tmp_path / "a", random_samples(3))
    with pytest.raises(ValueError, match="also one of its inputs"):
        merge_shards([tmp_path / "a"], tmp_path / "a", backend=backend)
    with open(tmp_path / "a.bin", "ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(ValueError, match="size disagrees"):
        merge_shards([tmp_path / "a"], tmp_path / "out", backend=backend)
    with pytest.raises(OSError, match="missing.idx"):
        merge_shards([tmp_path / "missing"], tmp_path / "out", backend=backend)
    assert not os.path.exists(tmp_path / "out.idx") and not os.path.exists(tmp_path / "out.idx.tmp")


@pytest.mark.parametrize("writer_cls", [ShardWriter, PyShardWriter])
def test_files_appear_only_at_finalize(tmp_path, writer_cls):
    writer = writer_cls(tmp_path / "s")
    writer.add_sample(**random_samples(1)[0])
    assert sorted(os.listdir(tmp_path)) == sorted(f"s{ext}.tmp" for ext in (".bin", ".img.bin"))
    writer.finalize()
    assert sorted(os.listdir(tmp_path)) == sorted(f"s{ext}" for ext in FILES)


@pytest.mark.parametrize("writer_cls", [ShardWriter, PyShardWriter])
def test_exception_in_with_block_aborts(tmp_path, writer_cls):
    with pytest.raises(KeyError):
        with writer_cls(tmp_path / "s") as writer:
            writer.add_sample(**random_samples(1)[0])
            raise KeyError("preprocessing failed")
    assert os.listdir(tmp_path) == []
    assert not writer.is_open


BAD_SAMPLES = {
    "lengths do not cover tokens": (
        dict(tokens=[1, 2, 3], segment_lengths=[2], segment_modes=[0]),
        "sum to 2",
    ),
    "unknown mode": (dict(tokens=[1], segment_lengths=[1], segment_modes=[5]), "unknown mode 5"),
    "image slot without image": (
        dict(tokens=[0], segment_lengths=[1], segment_modes=[2]),
        "1 image segments but 0",
    ),
    "wrong image ordinal": (
        dict(tokens=[1], segment_lengths=[1], segment_modes=[2], images=[JPEG_HEAD], widths=[4], heights=[4]),
        "ordinal 0",
    ),
    "long image slot": (
        dict(
            tokens=[0, 0], segment_lengths=[2], segment_modes=[2], images=[JPEG_HEAD], widths=[4], heights=[4]
        ),
        "exactly one token",
    ),
    "zero width": (
        dict(tokens=[0], segment_lengths=[1], segment_modes=[2], images=[JPEG_HEAD], widths=[0], heights=[4]),
        "zero width",
    ),
    "no segments": (dict(tokens=[], segment_lengths=[], segment_modes=[]), "no segments"),
    "bad format": (
        dict(
            tokens=[0],
            segment_lengths=[1],
            segment_modes=[2],
            images=[JPEG_HEAD],
            widths=[4],
            heights=[4],
            formats=[9],
        ),
        "format code 9",
    ),
    "token overflow": (dict(tokens=[2**31], segment_lengths=[1], segment_modes=[0]), "outside int32"),
}


@pytest.mark.parametrize("writer_cls", [ShardWriter, PyShardWriter])
@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_is_refused_and_leaves_writer_unchanged(tmp_path, writer_cls, case):
    good = random_samples(2, seed=9)
    bad, message = BAD_SAMPLES[case]
    with writer_cls(tmp_path / "s") as writer:
        writer.add_sample(**good[0])
        with pytest.raises(ValueError, match=message):
            writer.add_sample(**bad)
        writer.add_sample(**good[1])
    write(PyShardWriter, tmp_path / "expected", good)
    assert read_files(tmp_path / "s") == read_files(tmp_path / "expected")


def test_finalized_writer_refuses_more_samples(tmp_path):
    writer = write(ShardWriter, tmp_path / "s", random_samples(1))
    with pytest.raises(RuntimeError, match="already finalized"):
        writer.add_sample(**random_samples(1)[0])
    writer.abort()  # no-op after finalize: the published files stay
    assert os.path.exists(tmp_path / "s.idx")


def big_image_samples(n: int, seed: int = 0) -> list[dict]:
    """Samples whose images are large enough to bypass the C++ writer's buffer (direct writes)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        sizes = [int(rng.integers(1, 300_000)) for _ in range(1 + i % 3)]
        images = [JPEG_HEAD + rng.bytes(size) for size in sizes]
        text = rng.integers(0, 152_000, size=int(rng.integers(0, 5000))).astype(np.int32)
        samples.append(
            dict(
                tokens=np.concatenate([np.arange(len(images), dtype=np.int32), text]),
                segment_lengths=np.array([1] * len(images) + [len(text)], np.int32),
                segment_modes=np.array([2] * len(images) + [1], np.int8),
                images=images,
                widths=np.full(len(images), 640, np.uint32),
                heights=np.full(len(images), 480, np.uint32),
                source_id=i,
            )
        )
    return samples


def test_crc32_binding_equals_zlib_across_the_interleave_threshold():
    from megasail.data.format.native import C

    rng = np.random.default_rng(7)
    data = rng.bytes(40_000)
    for n in (0, 1, 7, 8, 9, 3071, 3072, 3073, 3079, 3080, 3081, 4099, 12_345, 39_999, 40_000):
        for start in (0, 3):
            chunk = data[start : start + n]
            assert C.crc32(chunk) == zlib.crc32(chunk), n
            assert C.crc32(chunk, 0xDEADBEEF) == zlib.crc32(chunk, 0xDEADBEEF), n
    assert C.crc32(memoryview(data)[5:9000]) == zlib.crc32(data[5:9000])


@pytest.mark.parametrize("sync", [True, False])
def test_large_images_and_sync_flag_keep_bytes_identical(tmp_path, sync):
    samples = big_image_samples(12, seed=1)
    cpp = write(lambda p: ShardWriter(p, sync=sync), tmp_path / "cpp", samples)
    py = write(lambda p: PyShardWriter(p, sync=sync), tmp_path / "py", samples)
    assert cpp.sync is sync and py.sync is sync
    assert read_files(tmp_path / "cpp") == read_files(tmp_path / "py")
    assert parse_image_index(tmp_path / "cpp.img.idx")["crc32"] == [
        zlib.crc32(im) for s in samples for im in s["images"]
    ]


def test_python_writer_fsyncs_only_when_asked(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    write(lambda p: PyShardWriter(p, sync=False), tmp_path / "a", random_samples(3))
    assert synced == []
    write(PyShardWriter, tmp_path / "b", random_samples(3))
    assert len(synced) == 4  # both data files and both indexes


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_merge_of_large_unsynced_shards_equals_one_writer(tmp_path, backend):
    samples = big_image_samples(10, seed=2)
    prefixes = []
    for k, (a, b) in enumerate([(0, 4), (4, 4), (4, 10)]):
        prefixes.append(str(tmp_path / f"shard_{k}"))
        write(lambda p: ShardWriter(p, sync=False), prefixes[-1], samples[a:b])
    write(PyShardWriter, tmp_path / "whole", samples)
    assert merge_shards(prefixes, tmp_path / "merged", backend=backend) == 10
    assert read_files(tmp_path / "merged") == read_files(tmp_path / "whole")


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs a second file system (/dev/shm)")
def test_merge_across_file_systems(tmp_path):
    """copy_file_range refuses some pairs of file systems; the merge then copies with read/write."""
    import tempfile

    samples = big_image_samples(6, seed=3)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        prefixes = [os.path.join(shm, "a"), str(tmp_path / "b")]
        write(ShardWriter, prefixes[0], samples[:3])
        write(ShardWriter, prefixes[1], samples[3:])
        write(ShardWriter, tmp_path / "whole", samples)
        assert merge_shards(prefixes, tmp_path / "merged") == 6
        assert merge_shards([str(tmp_path / "b"), prefixes[0]], os.path.join(shm, "m")) == 6
        shm_files = read_files(os.path.join(shm, "m"))
    assert read_files(tmp_path / "merged") == read_files(tmp_path / "whole")
    write(ShardWriter, tmp_path / "swapped", samples[3:] + samples[:3])
    assert shm_files == read_files(tmp_path / "swapped")


def test_merge_refuses_a_truncated_image_file(tmp_path):
    write(ShardWriter, tmp_path / "a", big_image_samples(2))
    os.truncate(tmp_path / "a.img.bin", 10)
    with pytest.raises(ValueError, match="size disagrees"):
        merge_shards([tmp_path / "a"], tmp_path / "out")
    assert not any(name.startswith("out") for name in os.listdir(tmp_path))


def test_unsynced_unit_reports_are_trusted_only_in_the_same_boot(tmp_path, monkeypatch):
    """Preprocessing's unit shards are not fsynced by default: a report from an earlier boot (a
    power loss may have torn its shard) is treated as missing; a killed process is no such case."""
    import json

    from megasail.data.preprocess import worker
    from megasail.data.preprocess.sources import WorkUnit

    unit = WorkUnit(
        index=3, source_id=0, path="in.jsonl", container="jsonl", start_byte=0, end_byte=0, first_line=1
    )
    path = worker.report_path(str(tmp_path), unit)
    for suffix in worker.UNIT_FILE_SUFFIXES:  # the unit's shard files exist; only the boot id decides
        open(worker.unit_prefix(str(tmp_path), unit) + suffix, "w").close()
    monkeypatch.setattr(worker, "boot_id", lambda: "boot-1")
    for report, kept in (
        ({"unit": 3, "unsynced_boot_id": "boot-1"}, True),
        ({"unit": 3, "unsynced_boot_id": "boot-0"}, False),
        ({"unit": 3, "unsynced_boot_id": None}, True),  # fsynced (--fsync-units)
        ({"unit": 3}, True),  # written before the boot id was recorded: always fsynced
    ):
        with open(path, "w") as f:
            json.dump(report, f)
        assert (worker.load_report(str(tmp_path), unit) is not None) is kept, report


def test_shard_merger_appending_one_at_a_time_equals_merge_shards(tmp_path):
    from megasail.data.format.writer import ShardMerger

    samples = big_image_samples(4, seed=4) + random_samples(20, seed=4)
    prefixes = []
    for k, (a, b) in enumerate([(0, 2), (2, 2), (2, 15), (15, 24)]):
        prefixes.append(str(tmp_path / f"shard_{k}"))
        write(lambda p: ShardWriter(p, sync=False), prefixes[-1], samples[a:b])
    write(PyShardWriter, tmp_path / "whole", samples)
    with ShardMerger(tmp_path / "merged") as merger:
        for k, prefix in enumerate(prefixes):
            merger.append(prefix)
            assert merger.num_shards == k + 1
            assert not os.path.exists(tmp_path / "merged.idx")  # published only at finalize
    assert merger.num_samples == 24 and not merger.is_open
    assert read_files(tmp_path / "merged") == read_files(tmp_path / "whole")
    with pytest.raises(RuntimeError, match="already finalized"):
        merger.append(prefixes[0])


def test_shard_merger_abort_and_bad_input_leave_no_files(tmp_path):
    from megasail.data.format.writer import ShardMerger

    write(ShardWriter, tmp_path / "a", random_samples(3))
    with pytest.raises(ValueError, match="also one of its inputs"):
        ShardMerger(tmp_path / "out").append(tmp_path / "out")
    merger = ShardMerger(tmp_path / "out")
    merger.append(tmp_path / "a")
    with pytest.raises(OSError, match="missing.idx"):
        merger.append(tmp_path / "missing")
    merger.abort()
    assert not merger.is_open
    assert sorted(os.listdir(tmp_path)) == sorted(f"a{ext}" for ext in FILES)


def test_streaming_merge_takes_shards_in_unit_order_whatever_order_they_finish(tmp_path):
    from megasail.data.preprocess.writer import StreamingMerge

    samples = random_samples(30, seed=12)
    shards = []
    for k in range(5):
        shards.append((k, str(tmp_path / f"unit_{k}")))
        write(lambda p: ShardWriter(p, sync=False), shards[-1][1], samples[6 * k : 6 * k + 6])
    write(PyShardWriter, tmp_path / "whole", samples)
    merge = StreamingMerge(str(tmp_path / "merged"), shards)
    finished = set()
    for k in (3, 1, 0, 4, 2):  # completion order of parallel workers
        finished.add(k)
        merge.feed(finished)
    assert merge.finish() == 30
    assert read_files(tmp_path / "merged") == read_files(tmp_path / "whole")
    assert merge.busy_seconds > 0

    incomplete = StreamingMerge(str(tmp_path / "other"), shards)
    incomplete.feed({0, 2})
    with pytest.raises(RuntimeError, match="4 unit shards not fed"):
        incomplete.finish()
    incomplete.abort()
    assert not any(name.startswith("other") for name in os.listdir(tmp_path))


def text_arrays(n: int, seed: int = 0):
    """A text-only dataset of n samples as whole arrays (PROMPT 0-5 tokens, TARGET 1-30) and as
    add_sample keyword arguments."""
    rng = np.random.default_rng(seed)
    lengths = np.stack([rng.integers(0, 6, n), rng.integers(1, 31, n)], axis=1).reshape(-1).astype(np.int32)
    tokens = rng.integers(0, 152_000, int(lengths.sum()), dtype=np.int32)
    modes = np.tile(np.array([0, 1], np.int8), n)
    doc_index = np.arange(0, 2 * n + 1, 2)
    sources = rng.integers(0, 2**32, n, dtype=np.uint32)
    return tokens, lengths, modes, doc_index, sources


def test_write_text_prefix_equals_one_writer(tmp_path):
    """Fails if the array writer's pointers, per-sample image ranges or sources differ from the
    sample writer's (planted: doc_image_start left one entry short)."""
    from megasail.data.format.writer import write_text_prefix

    tokens, lengths, modes, doc_index, sources = text_arrays(50, seed=5)
    assert write_text_prefix(tmp_path / "arrays", tokens, lengths, modes, doc_index, sources) == 50
    ends = np.cumsum(lengths)
    with ShardWriter(tmp_path / "samples") as writer:
        for d in range(50):
            first, last = 2 * d, 2 * d + 2
            start = ends[first - 1] if first else 0
            writer.add_sample(
                tokens[start : ends[last - 1]], lengths[first:last], modes[first:last], source_id=sources[d]
            )
    assert read_files(tmp_path / "arrays") == read_files(tmp_path / "samples")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(segment_modes=np.full_like(a["segment_modes"], 2)), "PROMPT"),
        (lambda a: a.update(tokens=a["tokens"][:-1]), "sum to"),
        (lambda a: a.update(doc_index=a["doc_index"][:-1]), "doc_index"),
        (lambda a: a.update(doc_source=a["doc_source"][:-1]), "doc_source"),
    ],
)
def test_write_text_prefix_refuses_inconsistent_arrays(tmp_path, change, message):
    """Fails if an array writer accepts image modes, lengths that miss tokens, a short document index
    or a short source list; nothing is left on disk."""
    from megasail.data.format.writer import write_text_prefix

    tokens, lengths, modes, doc_index, sources = text_arrays(5)
    arrays = dict(
        tokens=tokens, segment_lengths=lengths, segment_modes=modes, doc_index=doc_index, doc_source=sources
    )
    change(arrays)
    with pytest.raises(ValueError, match=message):
        write_text_prefix(tmp_path / "x", **arrays)
    assert os.listdir(tmp_path) == []


def test_merge_of_many_samples_equals_one_prefix(tmp_path):
    """300k samples in three shards: every index array outgrows the merger's spill buffers many
    times over. Fails if a spill file is joined out of order, flushed short, or rebased wrongly."""
    from megasail.data.format.writer import ShardMerger, write_text_prefix

    tokens, lengths, modes, doc_index, sources = text_arrays(300_000, seed=6)
    write_text_prefix(tmp_path / "whole", tokens, lengths, modes, doc_index, sources, sync=False)
    ends = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    with ShardMerger(tmp_path / "merged") as merger:
        for k, (a, b) in enumerate([(0, 100_000), (100_000, 100_001), (100_001, 300_000)]):
            s0, s1 = 2 * a, 2 * b
            write_text_prefix(
                tmp_path / f"s{k}",
                tokens[ends[s0] : ends[s1]],
                lengths[s0:s1],
                modes[s0:s1],
                doc_index[a : b + 1] - doc_index[a],
                sources[a:b],
                sync=False,
            )
            merger.append(tmp_path / f"s{k}")
    assert read_files(tmp_path / "merged") == read_files(tmp_path / "whole")
    assert not any(name.startswith("merged") and name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_merge_memory_does_not_grow_with_the_dataset(tmp_path):
    """tools/bench_preprocess.py's measurement at 100k and 800k text samples: the merging process's
    peak RSS grows by under 8 MB. Fails with the merged index held in memory (planted: the previous
    ShardMerger, +22 MB at these sizes)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_preprocess.py"
    spec = importlib.util.spec_from_file_location("bench_preprocess", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.bench_merge_memory([100_000, 800_000], 50_000, str(tmp_path))
    assert [r["samples"] for r in rows] == [100_000, 800_000]
    growth = rows[1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]
    assert growth < 8, f"merge peak RSS grew {growth:.1f} MB from 100k to 800k samples: {rows}"


def test_bench_loader_synthetic_prefix_equals_write_text_prefix(tmp_path):
    """tools/bench_loader.py writes its 100M-entry prefix section by section in chunks; its bytes equal
    write_text_prefix's for the same lengths (zero tokens). Fails if a chunk boundary repeats or
    drops a pointer, or the image index's 8-byte padding after doc_source is left out (odd n)."""
    import importlib.util
    from pathlib import Path

    from megasail.data.format.writer import write_text_prefix

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_loader.py"
    spec = importlib.util.spec_from_file_location("bench_loader", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for n, chunk in [(1, 4), (9, 4), (12, 3), (1001, 128)]:
        tokens = bench.write_synthetic_text_prefix(str(tmp_path / "streamed"), n, seed=3, chunk=chunk)
        lengths = np.concatenate(
            [
                np.random.default_rng([3, start]).integers(16, 1025, min(chunk, n - start)).astype(np.int32)
                for start in range(0, n, chunk)
            ]
        )
        assert tokens == int(lengths.sum())
        write_text_prefix(
            tmp_path / "arrays", np.zeros(tokens, np.int32), lengths, np.ones(n, np.int8), np.arange(n + 1)
        )
        assert read_files(tmp_path / "streamed") == read_files(tmp_path / "arrays"), (n, chunk)
