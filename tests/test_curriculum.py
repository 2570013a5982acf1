"""Blending and curriculum plans (epochs, weights, chunks, budgets) and DP balancing by cost."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_loader import write_prefix

from megasail.data.format.reader import IndexedMultimodalDataset
from megasail.data.loader.balance import SequenceCostModel, assign_to_ranks, imbalance
from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
from megasail.data.loader.curriculum import Curriculum, PlannedSequence, StagePlan, open_source
from megasail.data.loader.state import LoaderPosition
from megasail.models.flops import sequence_flops
from megasail.models.presets import PRESETS, sail_vl_2b


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend_data")
    return {"a": write_prefix(root / "a", 10, 21), "b": write_prefix(root / "b", 7, 22)}


def config(prefixes, weights=(1.0, 1.0), chunk=6, **overrides) -> DataConfig:
    stage = StageConfig("s", [SourceConfig(prefixes["a"], weights[0]), SourceConfig(prefixes["b"], weights[1])])
    settings_ = dict(seq_length=1024, global_batch_size=2, max_tiles=2, pack_chunk_samples=chunk, pack_window=4)
    settings_.update(overrides)
    return DataConfig(stages=[stage], **settings_)


def test_source_counts_equal_the_expanded_samples(prefixes):
    data = config(prefixes)
    """Fails if the per-chunk counts (from the index, no decoding) disagree with the expanded samples,
    for any order of sample indices (repeats included)."""
    source = open_source(data.stages[0].sources[0], data)
    ds = IndexedMultimodalDataset(prefixes["a"])
    order = np.array([3, 0, 9, 3, 7, 1])
    lengths, tiles = source.counter.counts(order)
    for i, n, t in zip(order.tolist(), lengths.tolist(), tiles.tolist(), strict=True):
        sample = ds.expand(i, data.max_tiles)
        assert n == len(sample.input_ids) and t == sum(sample.image_tiles)
    whole = ds.token_counts(data.max_tiles).tolist()
    assert source.counter.counts(np.arange(len(ds)))[0].tolist() == whole
    assert source.counter.range_counts(2, 9)[0].tolist() == whole[2:9]
    assert source.counter.range_counts(2, 9)[1].tolist() == source.counter.counts(np.arange(2, 9))[1].tolist()


def test_every_epoch_visits_every_sample_once_in_a_new_order(prefixes):
    data = config(prefixes, weights=(1.0, 0.0), chunk=5)  # only source a (10 samples), 2 chunks per epoch
    plan = StagePlan(0, data.stages[0], [open_source(s, data) for s in data.stages[0].sources], data)
    picks = np.concatenate([plan.chunk_members(c)[1] for c in range(6)])  # 3 epochs
    epochs = picks.reshape(3, 10)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(10))
    assert len({tuple(e) for e in epochs.tolist()}) == 3
    assert plan.source_epochs(4) == [2, 0]


def test_weights_set_each_chunks_mixture(prefixes):
    data = config(prefixes, weights=(3.0, 1.0), chunk=40)
    plan = StagePlan(0, data.stages[0], [open_source(s, data) for s in data.stages[0].sources], data)
    assert plan.picks_per_chunk.tolist() == [30, 10]
    sources, _ = plan.chunk_members(2)
    assert np.bincount(sources).tolist() == [30, 10]


def test_chunk_packing_keeps_every_member(prefixes):
    data = config(prefixes, chunk=12)
    plan = StagePlan(0, data.stages[0], [open_source(s, data) for s in data.stages[0].sources], data)
    for c in range(3):
        sources, samples = plan.chunk_members(c)
        chunk = plan.chunk(c)
        assert sorted(zip(chunk.sources.tolist(), chunk.samples.tolist(), strict=True)) == sorted(
            zip(sources.tolist(), samples.tolist(), strict=True))
        for p in range(chunk.num_packs):
            assert plan.sequence(c, p).num_tokens <= data.seq_length


def test_global_batches_walk_stages_by_budget(prefixes):
    """Fails if a stage overruns its budget to the end of a global batch (it is cut at the budget, the
    batch padded) or stops short of it."""
    stages = [StageConfig("one", [SourceConfig(prefixes["a"])], budget_tokens=3000, trainable=["projector"]),
              StageConfig("two", [SourceConfig(prefixes["b"])], budget_samples=10, trainable=["vision"])]
    curriculum = Curriculum(DataConfig(stages=stages, seq_length=1024, global_batch_size=2, max_tiles=2,
                                       pack_chunk_samples=8))
    position, seen = LoaderPosition(), []
    while not position.finished:
        sequences, after = curriculum.global_batch(position)
        seen.append((position.stage, sum(s.num_tokens for s in sequences), sum(len(s.samples) for s in sequences)))
        position = after
    one = [t for s, t, _ in seen if s == 0]
    two = [n for s, _, n in seen if s == 1]
    longest = int(IndexedMultimodalDataset(prefixes["a"]).token_counts(2).max())
    assert 3000 <= sum(one) < 3000 + longest  # ends with the sample that reaches the token budget
    assert sum(two) == 10  # a sample budget is exact
    with pytest.raises(StopIteration):
        curriculum.global_batch(position)


def test_config_validation_names_the_problem(prefixes):
    with pytest.raises(ValueError, match="no budget but is not the last"):
        DataConfig(stages=[StageConfig("x", [SourceConfig(prefixes["a"])]),
                           StageConfig("y", [SourceConfig(prefixes["b"])])]).validate()
    with pytest.raises(ValueError, match="unknown trainable modules"):
        DataConfig(stages=[StageConfig("x", [SourceConfig(prefixes["a"])], trainable=["llm"])]).validate()
    with pytest.raises(ValueError, match="sample .* tokens at max_tiles"):
        data = config(prefixes, seq_length=300)
        open_source(data.stages[0].sources[0], data)


# ---- balancing ----
@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 12), st.integers(0, 2**32))
def test_assignment_gives_every_rank_the_same_count(dp_size, per_rank, seed):
    costs = np.random.default_rng(seed).exponential(size=dp_size * per_rank)
    for balance in (False, True):
        ranks = assign_to_ranks(costs, dp_size, balance=balance)
        assert sorted(i for r in ranks for i in r) == list(range(len(costs)))
        assert {len(r) for r in ranks} == {per_rank}
    balanced = imbalance(costs, assign_to_ranks(costs, dp_size, True))
    # LPT's bound with equal counts: no rank exceeds the mean by more than the costliest item
    assert balanced <= 1 + costs.max() / costs.mean() / per_rank + 1e-9
    assert assign_to_ranks(costs, dp_size, True) == assign_to_ranks(costs.copy(), dp_size, True)


def test_balancing_evens_out_image_heavy_sequences():
    costs = np.array([10.0] * 4 + [1.0] * 12)  # image-heavy first: contiguous puts all on rank 0
    assert imbalance(costs, assign_to_ranks(costs, 4, balance=False)) > 2
    assert imbalance(costs, assign_to_ranks(costs, 4, balance=True)) == pytest.approx(1.0)


def test_cost_model_matches_the_model_flops():
    """The loader's 2B prices are the model's forward FLOPs with the LLM's attention counted causal.

    Fails if the token, tile or attention price drifts from megasail.models.flops."""
    model = sail_vl_2b()
    cost = SequenceCostModel.from_preset("sail_vl_2b")
    lm = model.language
    # models.flops counts l (l + 1) / 2 causal pairs of a sample; the cost model prices l^2 / 2
    pair = lm.num_layers * 4 * lm.hidden_size
    expected = sequence_flops(model, 8192, 7) - 8192 / 2 * pair
    assert cost.sequence_cost([8192], 7, 8192) == pytest.approx(expected, rel=1e-12)
    seq = PlannedSequence(0, 0, 0, (0, 0), (1, 2), (4000, 4192), (3, 4))
    assert cost.costs([seq], 8192)[0] < expected  # attention within samples only


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_costs_are_the_training_cost_model(name):
    """The loader's written-out preset prices equal what training builds from the preset's config.

    Fails if a preset's dimensions or the training cost model change without the table in balance.py."""
    from megasail.training.costs import cost_model

    assert SequenceCostModel.from_preset(name) == cost_model(PRESETS[name]())
