"""MultimodalDataLoader: batches equal an independent reading of the planned samples, bad images are
replaced and counted (PIL and DALI), stages expose their trainable modules, TP/PP ranks get their fields."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from dist_utils import run_distributed_test
from fixtures.multimodal_data import image_bytes
from PIL import Image

from megasail.data.format.reader import IndexedMultimodalDataset
from megasail.data.format.writer import ShardWriter
from megasail.data.images import dali
from megasail.data.images.decode import decode_tiles
from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
from megasail.data.loader.data_loader import MultimodalDataLoader, micro_batch_plans

IMAGE_IDS = {"img_start": 151665, "img_end": 151666, "img_context": 151667}
IMAGE_SIZES = [(64, 48), (900, 448), (300, 600)]  # 1, 2+1 and 1x2+1 tiles at max_tiles 2
needs_dali = pytest.mark.skipif(not dali.dali_available(), reason="nvidia-dali is not installed")


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header declares width x height pixels (refused before decoding)."""
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG")
    return out.getvalue()


def write_prefix(prefix, n: int, seed: int, image_every: int = 3, bad: dict | None = None) -> str:
    """n samples: a prompt, an image on every `image_every`-th sample, a target; `bad` maps a sample
    index to the encoded bytes its image gets instead (header size kept from IMAGE_SIZES)."""
    rng = np.random.default_rng(seed)
    bad = bad or {}
    with ShardWriter(prefix) as writer:
        for i in range(n):
            prompt = rng.integers(1, 1000, size=int(rng.integers(1, 20))).tolist()
            target = rng.integers(1, 1000, size=int(rng.integers(2, 120))).tolist()
            tokens, lengths, modes, images, widths, heights = prompt, [len(prompt)], [0], [], [], []
            if i % image_every == 0:
                width, height = IMAGE_SIZES[(i // image_every) % len(IMAGE_SIZES)]
                tokens = tokens + [0]
                lengths.append(1)
                modes.append(2)
                images.append(bad.get(i, image_bytes("JPEG", width, height, seed=seed * 1000 + i)))
                widths.append(width)
                heights.append(height)
            writer.add_sample(tokens + target, lengths + [len(target)], modes + [1], images, widths, heights,
                              source_id=0)
    with open(f"{prefix}.manifest.json", "w") as f:
        json.dump({"format_version": 1, "image_token_ids": IMAGE_IDS}, f)
    return str(prefix)


def make_config(prefixes: dict, **overrides) -> DataConfig:
    """Two stages: stage 'a' (budget 60 samples, projector) over a+b, then 'b' over b (all modules)."""
    settings = dict(seq_length=1024, global_batch_size=4, micro_batch_size=1, max_tiles=2, num_workers=0,
                    pack_chunk_samples=16, pack_window=8, decode_backend="pil", seed=7)
    settings.update(overrides)
    stages = [
        StageConfig("a", [SourceConfig(prefixes["a"], 2.0), SourceConfig(prefixes["b"], 1.0)], budget_samples=60,
                    trainable=["projector"]),
        StageConfig("b", [SourceConfig(prefixes["b"], 1.0)], trainable=["vision", "projector", "language"]),
    ]
    return DataConfig(stages=stages, **settings)


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader_data")
    return {"a": write_prefix(root / "a", 40, 1), "b": write_prefix(root / "b", 30, 2)}


def expected_row(plan_sequence, config: DataConfig, datasets):
    """Token ids, labels, loss mask and pixels of one planned row, built sample by sample."""
    ids, labels, mask, pixels, lengths = [], [], [], [], []
    for source, index in zip(plan_sequence.sources, plan_sequence.samples, strict=True):
        ds = datasets[config.stages[plan_sequence.stage].sources[source].prefix]
        sample = ds.expand(index, config.max_tiles)
        n = len(sample.input_ids)
        ids += sample.input_ids.tolist()
        labels += sample.input_ids[1:].tolist() + [config.pad_token_id]
        mask += sample.loss_mask[1:].astype(float).tolist() + [0.0]
        images = [bytes(im.data) for im in ds[index].images]
        pixels += decode_tiles(images, config.max_tiles, backend="pil") if images else []
        lengths.append(n)
    assert tuple(lengths) == plan_sequence.lengths  # the index's counts equal the expansion
    pad = config.seq_length - len(ids)
    return (ids + [config.pad_token_id] * pad, labels + [config.pad_token_id] * pad, mask + [0.0] * pad, pixels)


def test_batches_equal_the_planned_samples_read_alone(prefixes):
    config = make_config(prefixes)
    loader = MultimodalDataLoader(config, dp_rank=1, dp_size=2)
    plans = micro_batch_plans(loader.curriculum, loader.position, 1, 2, loader.cost_model)
    datasets = {p: IndexedMultimodalDataset(p) for p in prefixes.values()}
    for _ in range(6):
        batch, plan = next(loader), next(plans)
        (sequence,) = plan.sequences
        ids, labels, mask, pixels = expected_row(sequence, config, datasets)
        assert batch["input_ids"][0].tolist() == ids
        assert batch["labels"][0].tolist() == labels
        assert batch["loss_mask"][0].tolist() == mask
        segments = list(sequence.lengths) + ([config.seq_length - sequence.num_tokens]
                                             if sequence.num_tokens < config.seq_length else [])
        assert batch["cu_seqlens"].tolist() == np.concatenate([[0], np.cumsum(segments)]).tolist()
        assert "attention_mask" not in batch  # made from cu_seqlens on the training device
        if pixels:
            assert torch.equal(batch["pixel_values"], torch.cat(pixels))
        else:
            assert batch["pixel_values"] is None
        assert int((batch["input_ids"] == IMAGE_IDS["img_context"]).sum()) == 256 * sequence.num_tiles


def test_stages_switch_after_the_global_batch_that_spends_the_budget(prefixes):
    loader = MultimodalDataLoader(make_config(prefixes))  # 4 micro-batches of 1 row per global batch
    per_global_batch, modules = [], []
    for _ in range(12):
        stage, modules_now = loader.current_stage.name, loader.trainable_modules
        rows = [int(next(loader)["num_samples"].sum()) for _ in range(4)]
        per_global_batch.append((stage, sum(rows)))
        modules.append(modules_now)
    stages = [s for s, _ in per_global_batch]
    switch = stages.index("b")
    samples_a = np.cumsum([n for _, n in per_global_batch[:switch]])
    assert samples_a[-1] >= 60 and (switch == 1 or samples_a[-2] < 60)
    assert set(stages[switch:]) == {"b"}
    assert modules[switch - 1] == ["projector"] and modules[switch] == ["vision", "projector", "language"]


def test_worker_processes_give_the_same_batches(prefixes):
    reference = MultimodalDataLoader(make_config(prefixes, num_workers=0), 0, 2)
    workers = MultimodalDataLoader(make_config(prefixes, num_workers=2, prefetch_factor=2), 0, 2)
    for _ in range(5):
        a, b = next(reference), next(workers)
        for key in ("input_ids", "labels", "loss_mask", "cu_seqlens", "pixel_values"):
            assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key
    workers.close()


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_corrupt_image_and_bomb_are_replaced_counted_and_logged(tmp_path, backend, caplog):
    good = image_bytes("JPEG", 64, 48, seed=5)
    bad = {0: good[: len(good) // 2], 3: png_bomb(), 6: b"<html>not an image</html>"}
    prefix = write_prefix(tmp_path / "bad", 12, 3, image_every=3, bad=bad)
    config = DataConfig(stages=[StageConfig("only", [SourceConfig(prefix, 1.0, name="web")], budget_samples=12)],
                        seq_length=1024, global_batch_size=2, max_tiles=2, num_workers=0, pack_chunk_samples=12,
                        decode_backend=backend, balance_dp=False)
    loader = MultimodalDataLoader(config)
    rows = [row for batch in loader for row in batch["num_samples"].tolist()]
    stats = loader.statistics()
    assert stats["bad_images_too_large"] == 1 and stats["bad_images_corrupt"] == 2
    assert stats["skipped_images"] == 3 and stats["bad_samples"] == 3
    assert stats["replaced_samples"] + stats["unreplaced_samples"] == 3
    assert stats["replaced_samples"] == 3  # the next sample (text-only, short) always fits
    assert sum(rows) == 12 and stats["samples"] == 12
    assert {(b["source"], b["sample"]) for b in stats["recent_bad_samples"]} == {("web", 0), ("web", 3), ("web", 6)}
    assert any("sample 3: too_large" in r.getMessage() for r in caplog.records)
    assert stats["decode_backend"] == backend


def test_token_counts_of_the_plan_match_the_batches(prefixes):
    loader = MultimodalDataLoader(make_config(prefixes))
    for _ in range(8):
        batch = next(loader)
        assert batch["loss_mask"][batch["input_ids"] == 151643].sum() == 0
    stats = loader.statistics()
    assert 0.0 <= stats["padding_fraction"] < 0.5 and stats["images"] > 0


# ---- tensor / pipeline parallel: one reader per model-parallel group ----
def test_next_step_fetches_one_optimizer_step(prefixes):
    config = make_config(prefixes)
    loader, reference = MultimodalDataLoader(config, 1, 2), MultimodalDataLoader(config, 1, 2)
    assert loader.microbatches_per_step == 2  # 4 rows / DP 2 / 1 row per micro-batch
    for _ in range(3):
        step = loader.next_step(2)
        assert len(step) == 2 and not loader.mid_global_batch
        for got in step:
            want = next(reference)
            assert all(torch.equal(got[k], want[k]) for k in ("input_ids", "labels", "cu_seqlens"))
        assert loader.position == reference.position
    with pytest.raises(ValueError, match="one optimizer step is 2 micro-batches"):
        loader.next_step(4)
    next(loader)
    with pytest.raises(RuntimeError, match="inside a global batch"):
        loader.next_step()


def _model_parallel_ranks(rank, world_size, prefixes, tp, pp):
    from megasail.data.loader.model_parallel import build_data_loader, stage_fields
    from megasail.runtime import initialize

    initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    config = make_config(prefixes)
    loader = build_data_loader(config)
    reference = MultimodalDataLoader(config)  # what the single reader produces
    assert loader.reads_data == (rank == 0)
    is_first, is_last = pp == 1 or rank == 0, pp == 1 or rank == 1
    wanted = set(stage_fields(is_first, is_last))
    assert loader.microbatches_per_step == 4
    for _ in range(2):  # two whole global batches (4 micro-batches each at DP 1), a step at a time
        for got in loader.next_step(4):
            want = next(reference)
            assert "attention_mask" not in got  # no rank makes the s x s mask: the forward step does
            for key, value in got.items():
                if key in wanted:
                    assert value is not None and torch.equal(value, want[key]), (rank, key)
                else:
                    assert value is None, (rank, key)
        assert loader.position == reference.position
    assert loader.state_dict() == reference.state_dict()
    assert loader.trainable_modules == reference.trainable_modules
    assert loader.statistics()["samples"] == reference.statistics()["samples"] > 0


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_model_parallel_ranks_get_their_fields_from_one_reader(prefixes, tp, pp):
    run_distributed_test(_model_parallel_ranks, 2, prefixes, tp, pp)


TINY_VOCAB_PAD = 255  # pad id inside the tiny model's vocabulary of 256 (250 is its image token)


def write_text_prefix(prefix, n: int, seed: int) -> str:
    """n text-only samples with token ids inside the tiny model's vocabulary (1..249)."""
    rng = np.random.default_rng(seed)
    with ShardWriter(prefix) as writer:
        for _ in range(n):
            prompt = rng.integers(1, 250, size=int(rng.integers(1, 8))).tolist()
            target = rng.integers(1, 250, size=int(rng.integers(2, 24))).tolist()
            writer.add_sample(prompt + target, [len(prompt), len(target)], [0, 1], [], [], [], source_id=0)
    with open(f"{prefix}.manifest.json", "w") as f:
        json.dump({"format_version": 1, "image_token_ids": {"img_start": 251, "img_end": 252, "img_context": 250}}, f)
    return str(prefix)


def _pipeline_schedule_fed_by_loader(rank, world_size, prefix, vpp):
    import math

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from model_utils import tiny_model_config

    from megasail.config import ParallelConfig
    from megasail.data.loader.balance import SequenceCostModel
    from megasail.data.loader.model_parallel import build_data_loader
    from megasail.runtime import initialize
    from megasail.training import build_model_chunks, forward_step

    parallel = ParallelConfig(pipeline=2, virtual_pipeline=vpp, distributed_optimizer=False)
    initialize(1, 2, vpp, seed=7)
    model_config = tiny_model_config(packed_sequences=True)
    model_config.language.num_layers = 4
    chunks = build_model_chunks(model_config, parallel)
    for chunk in chunks:
        chunk.eval()
    seq = 64
    config = DataConfig(stages=[StageConfig("text", [SourceConfig(prefix)], trainable=["language"])],
                        seq_length=seq, global_batch_size=4, micro_batch_size=1, num_workers=0,
                        pack_chunk_samples=16, pack_window=8, pad_token_id=TINY_VOCAB_PAD, seed=3)
    tiny_costs = SequenceCostModel.from_preset("tiny")
    loader = build_data_loader(config, cost_model=tiny_costs)
    reference = MultimodalDataLoader(config, cost_model=tiny_costs)
    forward_backward = get_forward_backward_func()
    for _ in range(2):
        # the rule: fetch the whole step first (a collective on the pipeline group), then run the schedule
        batches = loader.next_step(loader.microbatches_per_step)
        expected = reference.next_step()
        data = iter(batches) if len(chunks) == 1 else [iter(batches) for _ in chunks]
        with torch.no_grad():
            logs = forward_backward(forward_step_func=forward_step, data_iterator=data,
                                    model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(batches),
                                    seq_length=seq, micro_batch_size=1, forward_only=True)
        assert loader.position == reference.position
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            assert len(logs) == len(batches) == 4
            for log, batch in zip(logs, expected, strict=True):
                values = log["lm loss"].reshape(-1).tolist()  # [loss sum, loss tokens] (or a mean)
                assert batch["loss_mask"].sum() > 0 and all(math.isfinite(v) and v > 0 for v in values)
                if len(values) == 2:
                    assert values[1] == batch["loss_mask"].sum()
        else:
            assert not logs
    assert loader.state_dict() == reference.state_dict()


@pytest.mark.distributed
@pytest.mark.parametrize("vpp", [None, 2])
def test_pipeline_schedule_runs_on_batches_fetched_before_it(tmp_path, vpp):
    """PP=2 through megatron's real 1F1B (and interleaved) schedule, fed by ModelParallelDataLoader.next_step."""
    run_distributed_test(_pipeline_schedule_fed_by_loader, 2, write_text_prefix(tmp_path / "text", 60, 5), vpp)


# ---- config surface, stage presets, benchmark ----
def test_every_data_config_field_has_a_doc():
    import dataclasses

    from megasail.data.loader import config as data_config

    for cls in (data_config.SourceConfig, data_config.StageConfig, data_config.DataConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no doc"


def test_sail_vl_stage_presets_load_in_curriculum_order(repo_root):
    from pathlib import Path

    from megasail.data.loader.config import load_stages

    names = ["pretrain_alignment", "pretrain_advance", "sft_knowledge", "sft_instruction", "sft_preference"]
    stages = load_stages([Path(repo_root) / "examples/configs/stages" / f"{n}.yaml" for n in names])
    assert [s.name for s in stages] == names
    assert [s.trainable for s in stages[:2]] == [["projector"], ["vision", "projector"]]
    assert all(s.trainable == ["vision", "projector", "language"] for s in stages[2:])
    assert [s.budget_tokens for s in stages[:2]] == [131_000_000_000, 524_000_000_000]
    assert [s.budget_samples for s in stages[2:]] == [21_000_000, 12_000_000, 3_500_000]
    DataConfig(stages=stages).validate()


def test_bench_loader_quick_runs(repo_root):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": repo_root}
    proc = subprocess.run([sys.executable, os.path.join(repo_root, "tools", "bench_loader.py"), "--quick"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for title in ("## Packing efficiency", "## DP cost imbalance", "## Loader vs decode alone",
                  "## Validation: reuse vs rebuild"):
        assert title in proc.stdout
    assert "| 8192 |" in proc.stdout and "LPT by estimated FLOPs" in proc.stdout
    help_text = subprocess.run([sys.executable, os.path.join(repo_root, "tools", "bench_loader.py"), "--help"],
                               capture_output=True, text=True, env=env, timeout=120)
    assert help_text.returncode == 0 and "--quick" in help_text.stdout


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_replacement_with_another_tile_count_keeps_pixels_in_order(tmp_path, backend, num_workers):
    """Every sample has an image (1, 3, 3, 1, ... tiles); sample 0's (1 tile) is corrupt and sample 1
    (3 tiles) replaces it, so the micro-batch's tiles are laid out anew after decoding."""
    good = image_bytes("JPEG", 64, 48, seed=5)
    prefix = write_prefix(tmp_path / "bad", 6, 3, image_every=1, bad={0: good[: len(good) // 2]})
    config = DataConfig(stages=[StageConfig("only", [SourceConfig(prefix, 1.0)], budget_samples=6)],
                        seq_length=8192, global_batch_size=1, max_tiles=2, num_workers=num_workers,
                        pack_chunk_samples=6, decode_backend=backend, balance_dp=False)
    loader = MultimodalDataLoader(config)
    plans = micro_batch_plans(loader.curriculum, loader.position, 0, 1, loader.cost_model)
    ds = IndexedMultimodalDataset(prefix)
    checked = changed = 0
    for batch, plan in zip(loader, plans, strict=False):
        (sequence,) = plan.sequences
        samples = list(sequence.samples)
        if 0 in samples:  # the replacement comes right after the samples kept before it
            samples[samples.index(0)] = 1
        pixels = [t for i in samples for t in decode_tiles([bytes(im.data) for im in ds[i].images], 2,
                                                           backend=backend)]
        assert torch.equal(batch["pixel_values"], torch.cat(pixels))
        checked += 1
        changed += 0 in sequence.samples and batch["pixel_values"].shape[0] == sequence.num_tiles + 2
    stats = loader.statistics()
    loader.close()
    assert checked and changed == 1 and stats["bad_samples"] == 1 and stats["replaced_samples"] == 1


def test_in_process_batches_decode_straight_into_pixel_values(prefixes, monkeypatch):
    """No bad image: pixel_values is the tensor the images were decoded into (nothing concatenated)."""
    from megasail.data.loader import packing

    def no_concat(*args, **kwargs):
        raise AssertionError("pixel tiles were concatenated")

    monkeypatch.setattr(packing, "concat_tiles", no_concat)
    loader = MultimodalDataLoader(make_config(prefixes))
    batches = [next(loader) for _ in range(6)]
    assert any(b["pixel_values"] is not None for b in batches)
