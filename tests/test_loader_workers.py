"""Loader worker processes: how they start (fork / spawn / forkserver) and what a spawned worker decodes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.multimodal_data import image_bytes

from megasail.data.format.writer import ShardWriter
from megasail.data.images import dali
from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
from megasail.data.loader.data_loader import MultimodalDataLoader
from megasail.data.loader.worker import worker_start_method

needs_dali = pytest.mark.skipif(not dali.dali_available(), reason="nvidia-dali is not installed")
IMAGE_SIZES = [(64, 48), (900, 448), (300, 600)]  # 1, 2+1 and 1x2+1 tiles at max_tiles 2


def write_prefix(prefix: Path, n: int) -> str:
    """n samples (prompt, an image on every second one, target) and a manifest with the image token ids."""
    rng = np.random.default_rng(0)
    with ShardWriter(str(prefix)) as writer:
        for i in range(n):
            prompt = rng.integers(1, 1000, size=int(rng.integers(1, 20))).tolist()
            target = rng.integers(1, 1000, size=int(rng.integers(2, 120))).tolist()
            tokens, lengths, modes, images, widths, heights = prompt, [len(prompt)], [0], [], [], []
            if i % 2 == 0:
                width, height = IMAGE_SIZES[(i // 2) % len(IMAGE_SIZES)]
                tokens, lengths, modes = tokens + [0], lengths + [1], modes + [2]
                images.append(image_bytes("JPEG", width, height, seed=i))
                widths.append(width)
                heights.append(height)
            writer.add_sample(
                tokens + target, lengths + [len(target)], modes + [1], images, widths, heights, source_id=0
            )
    Path(f"{prefix}.manifest.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "image_token_ids": {"img_start": 151665, "img_end": 151666, "img_context": 151667},
            }
        )
    )
    return str(prefix)


def config(prefix: str, **overrides) -> DataConfig:
    settings = dict(
        seq_length=1024,
        global_batch_size=2,
        micro_batch_size=1,
        max_tiles=2,
        num_workers=0,
        pack_chunk_samples=12,
        pack_window=6,
        decode_backend="dali",
        seed=3,
    )
    settings.update(overrides)
    return DataConfig(stages=[StageConfig("only", [SourceConfig(prefix)], budget_samples=12)], **settings)


def worker_command_lines(loader: MultimodalDataLoader) -> list[str]:
    """/proc cmdline of the loader's live worker processes (a spawned worker runs spawn_main)."""
    pids = [w.pid for w in loader._iterator._workers]
    return [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in pids]


@needs_dali
@pytest.mark.parametrize("start", ["spawn"])  # forkserver takes the same path
def test_spawned_workers_decode_with_dali_like_the_main_process(tmp_path, start):
    """Workers started with spawn/forkserver (as on a GPU machine) give the in-process batches bit for bit,
    decoded by DALI (its CPU pipeline here).

    Fails if the DataLoader ignores data.worker_start (the workers are forked: their command line is the
    parent's). The main process has opened the dataset before the workers start, so the builder pickled
    into each worker carries an open IndexedMultimodalDataset."""
    prefix = write_prefix(tmp_path / "ds", 12)
    reference = [b for b in MultimodalDataLoader(config(prefix))]
    loader = MultimodalDataLoader(config(prefix, num_workers=2, worker_start=start))
    loader.builder.dataset(0, 0)  # opened in the main process before the workers start
    first = next(loader)
    assert all("multiprocessing" in line and "pytest" not in line for line in worker_command_lines(loader))
    batches = [first, *loader]
    assert len(batches) == len(reference) > 2
    for got, want in zip(batches, reference, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value), key
            else:
                assert got[key] == value, key
    stats = loader.statistics()
    assert set(stats["decode_backend_counts"]) == {"dali_cpu"} and stats["images"] > 0


def test_worker_start_auto_spawns_only_where_a_gpu_decodes(monkeypatch):
    """Fails if auto forks although DALI decodes on a GPU (the worker could not create its CUDA context),
    or spawns on CPU (start-up cost for nothing), or if the PIL backend spawns."""
    monkeypatch.setattr(dali, "dali_gpu_count", lambda: 0)
    assert worker_start_method("auto", "dali") == "fork"
    monkeypatch.setattr(dali, "dali_gpu_count", lambda: 1)
    monkeypatch.setattr(dali, "fn", object())  # as if DALI were installed
    assert worker_start_method("auto", "auto") == "spawn"
    assert worker_start_method("auto", "dali") == "spawn"
    assert worker_start_method("auto", "pil") == "fork"
    assert worker_start_method("fork", "dali") == "fork"
    with pytest.raises(ValueError, match="worker_start must be one of"):
        config("p", worker_start="threads").validate()


@pytest.mark.gpu
@pytest.mark.skipif(dali.dali_gpu_count() == 0, reason="needs a GPU visible to DALI")
def test_spawned_workers_decode_on_the_gpu(tmp_path):
    """With a GPU, auto-started workers own a DALI mixed pipeline: pixels arrive on the GPU, close to PIL's.

    Fails if workers are forked (DALI mixed is refused there and decoding falls back to the CPU)."""
    prefix = write_prefix(tmp_path / "ds", 12)
    reference = [b for b in MultimodalDataLoader(config(prefix, decode_backend="pil"))]
    loader = MultimodalDataLoader(config(prefix, num_workers=2))
    batches = list(loader)
    assert set(loader.statistics()["decode_backend_counts"]) == {"dali_mixed"}
    for got, want in zip(batches, reference, strict=True):
        if want["pixel_values"] is None:
            continue
        assert got["pixel_values"].is_cuda
        diff = (got["pixel_values"].cpu() - want["pixel_values"]).abs().mean(dim=(1, 2, 3))
        assert float(diff.max()) < 2 / 255 / 0.225  # per tile, 2/255 in pixel units
