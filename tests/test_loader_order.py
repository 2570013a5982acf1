"""Data order read back from the loader's batches, as training sees it: every sample of an epoch once,
packed rows in a random order (not sorted by content), and DP balancing that actually balances.

Each sample's first token is a unique id, so a test recovers which samples a batch trained (a sample
starts where position_ids restart at 0) without asking the planner.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from fixtures.multimodal_data import image_bytes

from megasail.data.format.writer import ShardWriter
from megasail.data.loader.balance import SequenceCostModel, assign_to_ranks
from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
from megasail.data.loader.data_loader import MultimodalDataLoader
from megasail.data.loader.state import LoaderPosition

ID_BASE = 200_000  # sample ids live above every other token id of these datasets
PAD = 0
SEQ = 2048
# costs with the weight of a real VLM: a 448px tile costs as much as a few hundred LLM token slots
COSTS = SequenceCostModel(token_flops=1.0, pair_flops=1e-4, tile_flops=300.0)
IMAGE_IDS = {"img_start": 151665, "img_end": 151666, "img_context": 151667}


def write_id_prefix(prefix, kinds: list[str], source: int, seed: int) -> str:
    """One sample per kind: "text" (1200-1800 tokens, no image), "tile1" (a 64x48 image: 1 tile) or
    "tile3" (900x448: 2 tiles + thumbnail at max_tiles 2), "short" (20-200 text tokens). Sample i's
    first token is ID_BASE + source * 100_000 + i."""
    rng = np.random.default_rng(seed)
    with ShardWriter(str(prefix)) as writer:
        for i, kind in enumerate(kinds):
            first = ID_BASE + source * 100_000 + i
            if kind in ("text", "short"):
                n = int(rng.integers(1200, 1800)) if kind == "text" else int(rng.integers(20, 200))
                body = rng.integers(1, 1000, size=n).tolist()
                writer.add_sample([first] + body, [1, n], [0, 1], [], [], [], source_id=0)
                continue
            width, height = (64, 48) if kind == "tile1" else (900, 448)
            target = rng.integers(1, 1000, size=int(rng.integers(20, 60))).tolist()
            writer.add_sample([first, 0] + target, [1, 1, len(target)], [0, 2, 1],
                              [image_bytes("JPEG", width, height, seed=seed * 1000 + i)], [width], [height],
                              source_id=0)
    with open(f"{prefix}.manifest.json", "w") as f:
        json.dump({"format_version": 1, "image_token_ids": IMAGE_IDS}, f)
    return str(prefix)


def sample_ids(batch: dict) -> list[list[int]]:
    """Per row of a batch: the ids of its samples, in order (padding segments skipped)."""
    rows = []
    for ids, pos in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist(), strict=True):
        rows.append([t for t, p in zip(ids, pos, strict=True) if p == 0 and t >= ID_BASE])
    return rows


def read_global_batches(config: DataConfig, dp_size: int, cost_model=COSTS) -> list[list[list[dict]]]:
    """[global batch][rank] -> that rank's micro-batches, reading every rank's loader to the end."""
    loaders = [MultimodalDataLoader(config, r, dp_size, cost_model=cost_model) for r in range(dp_size)]
    steps = []
    while True:
        try:
            steps.append([loader.next_step() for loader in loaders])
        except StopIteration:
            return steps


def tiles_of(batch: dict) -> int:
    return 0 if batch["pixel_values"] is None else int(batch["pixel_values"].shape[0])


@pytest.fixture(scope="module")
def mixed_prefix(tmp_path_factory):
    """192 samples in the proportions of the original report: 64 long text-only, 64 of 1 tile, 64 of 3."""
    kinds = ["text", "tile1", "tile3"] * 64
    return write_id_prefix(tmp_path_factory.mktemp("order") / "mixed", kinds, source=0, seed=5)


def one_epoch_config(prefix: str, **overrides) -> DataConfig:
    settings = dict(seq_length=SEQ, global_batch_size=8, micro_batch_size=1, max_tiles=2, num_workers=0,
                    decode_backend="pil", seed=11, pad_token_id=PAD)
    settings.update(overrides)
    stage = StageConfig("sft", [SourceConfig(prefix)], budget_samples=192, trainable=["language"])
    return DataConfig(stages=[stage], **settings)


@pytest.fixture(scope="module")
def epoch_at_dp4(mixed_prefix):
    return read_global_batches(one_epoch_config(mixed_prefix), 4)


def test_one_epoch_trains_every_sample_exactly_once(epoch_at_dp4):
    """Fails if packing shuffles a chunk that spans many epochs of a small source (the default chunk of
    65,536 picks spans 341 epochs of these 192 samples), or if a global batch skips or repeats a row."""
    seen = Counter(i for step in epoch_at_dp4 for rank in step for b in rank for row in sample_ids(b) for i in row)
    assert len(seen) == 192 and set(seen.values()) == {1}, (
        f"{len(seen)} distinct samples, most repeated {seen.most_common(1)}")


def test_rows_reach_global_batches_in_random_order(epoch_at_dp4):
    """Fails if packed rows keep the packer's longest-first order (global batches then go all text-only,
    then all 1-tile, then all 3-tile): the spread of per-batch tile totals must look like that of the
    same rows dealt out in a random order, not like a sorted deal."""
    rows = [(tiles_of(b), len(b["input_ids"])) for step in epoch_at_dp4 for rank in step for b in rank]
    per_row = np.array([t for t, n in rows if n == 1], dtype=np.float64)
    steps = len(epoch_at_dp4)
    totals = np.array([sum(tiles_of(b) for rank in step for b in rank) for step in epoch_at_dp4], dtype=np.float64)
    observed = totals[:-1].var()  # the stage's last global batch is padded with empty rows
    rng = np.random.default_rng(0)
    size = len(per_row) // steps
    random_deals = [rng.permutation(per_row)[: size * (steps - 1)].reshape(steps - 1, size).sum(1).var()
                    for _ in range(400)]
    sorted_deal = np.sort(per_row)[: size * (steps - 1)].reshape(steps - 1, size).sum(1).var()
    assert observed <= np.quantile(random_deals, 0.99), (observed, np.quantile(random_deals, 0.99), sorted_deal)
    assert observed < sorted_deal / 4


def rank_costs(step: list[list[dict]]) -> np.ndarray:
    """Estimated cost of each rank's share of one global batch, from what its batches hold."""
    loads = []
    for rank in step:
        load = 0.0
        for b in rank:
            for ids, pos in zip(b["input_ids"].numpy(), b["position_ids"].numpy(), strict=True):
                starts = np.flatnonzero(pos == 0).tolist() + [SEQ]
                lengths = [hi - lo for lo, hi in zip(starts[:-1], starts[1:], strict=True) if ids[lo] >= ID_BASE]
                load += SEQ * COSTS.token_flops + sum(n * n for n in lengths) * COSTS.pair_flops
            load += tiles_of(b) * COSTS.tile_flops
        loads.append(load)
    return np.array(loads)


def test_balancing_lowers_the_per_rank_imbalance(mixed_prefix, epoch_at_dp4):
    """Fails if balancing is off or does nothing (as when every global batch holds look-alike rows): the
    slowest rank's cost over the mean, averaged over the epoch, must drop below the contiguous split's."""
    contiguous = read_global_batches(one_epoch_config(mixed_prefix, balance_dp=False), 4)

    def mean_imbalance(steps):
        ratios = [c.max() / c.mean() for c in map(rank_costs, steps[:-1])]
        return float(np.mean(ratios))

    balanced, plain = mean_imbalance(epoch_at_dp4), mean_imbalance(contiguous)
    assert balanced < plain - 0.02, (balanced, plain)
    assert balanced < 1.1


def test_each_rank_gets_the_lpt_assignment_of_the_plan(mixed_prefix, epoch_at_dp4):
    """Fails if the loader ignores tiles (or anything else) in the cost, or does not balance: each rank's
    samples per global batch must be those assign_to_ranks gives for costs computed here from the plan's
    sample lengths and tiles."""
    loader = MultimodalDataLoader(one_epoch_config(mixed_prefix), 0, 4, cost_model=COSTS)
    position = LoaderPosition()
    for step in epoch_at_dp4:
        sequences, position = loader.curriculum.global_batch(position)
        costs = [SEQ * COSTS.token_flops + sum(n * n for n in s.lengths) * COSTS.pair_flops
                 + sum(s.tiles) * COSTS.tile_flops for s in sequences]
        expected = assign_to_ranks(np.array(costs), 4, balance=True)
        for rank, batches in enumerate(step):
            got = sorted(i for b in batches for row in sample_ids(b) for i in row)
            want = sorted(ID_BASE + i for j in expected[rank] for i in sequences[j].samples)
            assert got == want


def test_small_source_epochs_finish_before_the_next_begins(tmp_path):
    """Fails if a source smaller than its share of a chunk has its epochs mixed (a sample seen again
    before another was seen once): after every global batch, each sample of each source has been trained
    either k or k+1 times. The mix of the original report: 400 and 3,000 text samples, weights 1 and 3,
    budget 2,000 samples."""
    small = write_id_prefix(tmp_path / "small", ["short"] * 400, source=0, seed=1)
    large = write_id_prefix(tmp_path / "large", ["short"] * 3000, source=1, seed=2)
    stage = StageConfig("mix", [SourceConfig(small, 1.0), SourceConfig(large, 3.0)], budget_samples=2000,
                        trainable=["language"])
    config = DataConfig(stages=[stage], seq_length=1024, global_batch_size=8, micro_batch_size=2, num_workers=0,
                        seed=3, pad_token_id=PAD)
    counts = {0: np.zeros(400, dtype=np.int64), 1: np.zeros(3000, dtype=np.int64)}
    total = 0
    for step in read_global_batches(config, 2):
        for rank in step:
            for b in rank:
                for row in sample_ids(b):
                    for i in row:
                        source, index = divmod(i - ID_BASE, 100_000)
                        counts[source][index] += 1
                        total += 1
        for source, c in counts.items():
            assert c.max() - c.min() <= 1, f"source {source}: a sample trained {c.max()} times, another {c.min()}"
    assert total == 2000  # the stage ends exactly at its budget
    assert counts[1].max() == 1 and counts[0].min() >= 1  # the small source wrapped, the large one did not
