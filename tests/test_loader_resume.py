"""Resume: N batches + save + fresh loader + N more == 2N batches, across a stage boundary, at DP=2
(simulated and with 2 gloo processes); a DP=2 state restores at DP=1 and continues with the same samples."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from dist_utils import run_distributed_test
from test_loader import make_config, write_prefix

from megasail.data.loader.data_loader import MultimodalDataLoader, micro_batch_plans
from megasail.data.loader.state import LoaderPosition

KEYS = ("input_ids", "position_ids", "labels", "loss_mask", "cu_seqlens", "pixel_values")
PER_RANK_GLOBAL_BATCH = 2  # micro-batches of one rank per global batch (4 rows / DP 2 / 1 row)


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_data")
    # text-heavy (an image every 6th sample) so decoding keeps the test fast
    return {"a": write_prefix(root / "a", 40, 11, image_every=6), "b": write_prefix(root / "b", 30, 12, image_every=6)}


def assert_same_batch(a: dict, b: dict) -> None:
    for key in KEYS:
        if a[key] is None or b[key] is None:
            assert a[key] is None and b[key] is None, key
        else:
            assert torch.equal(a[key], b[key]), key


def take(loader, count: int) -> list[dict]:
    return [next(loader) for _ in range(count)]


def test_state_is_small_and_global(prefixes):
    loader = MultimodalDataLoader(make_config(prefixes), 0, 2)
    take(loader, 2 * PER_RANK_GLOBAL_BATCH)
    state = loader.state_dict()
    assert set(state["position"]) == set(LoaderPosition.__dataclass_fields__)
    assert state["position"]["global_batches"] == 2
    next(loader)
    with pytest.raises(RuntimeError, match="between global batches"):
        loader.state_dict()


@pytest.mark.parametrize("global_batches", [1, 2])  # stage a lasts 3 global batches: 2 + 2 crosses it
def test_resume_equals_uninterrupted_at_dp2(prefixes, global_batches):
    config = make_config(prefixes)
    n = global_batches * PER_RANK_GLOBAL_BATCH
    for rank in (0, 1):
        straight = take(MultimodalDataLoader(config, rank, 2), 2 * n)
        first = MultimodalDataLoader(config, rank, 2)
        before = take(first, n)
        state = first.state_dict()
        resumed = MultimodalDataLoader(config, rank, 2)
        resumed.load_state_dict(state)
        after = take(resumed, n)
        for a, b in zip(straight, before + after, strict=True):
            assert_same_batch(a, b)
    assert resumed.current_stage.name == ("b" if global_batches == 2 else "a")


def test_restore_is_independent_of_the_position(prefixes, monkeypatch):
    from megasail.data.loader.curriculum import StagePlan

    packed = []
    original = StagePlan.chunk_members
    monkeypatch.setattr(StagePlan, "chunk_members", lambda self, c: packed.append(c) or original(self, c))
    config = make_config(prefixes)
    far = LoaderPosition(stage=1, chunk=10**6, pack=0, global_batches=5000)
    loader = MultimodalDataLoader(config, 0, 2)
    loader.load_state_dict({**loader.state_dict(), "position": far.__dict__})
    batch = next(loader)  # epochs of chunk 10**6 come from arithmetic: no earlier chunk is computed
    assert batch["input_ids"].shape == (1, config.seq_length)
    assert packed and min(packed) == 10**6 and max(packed) <= 10**6 + 1


@pytest.mark.parametrize("setting,value", [("seq_length", 2048), ("tile_size", 224), ("max_tiles", 3),
                                           ("min_tiles", 2), ("seed", 8)])
def test_state_from_other_data_settings_is_refused(prefixes, setting, value):
    """Each of these changes token counts or the order, so a saved position would point elsewhere."""
    state = MultimodalDataLoader(make_config(prefixes)).state_dict()
    with pytest.raises(ValueError, match=f"different data settings \\({setting}\\)"):
        MultimodalDataLoader(make_config(prefixes, **{setting: value})).load_state_dict(state)


def test_tile_size_changes_the_token_counts():
    """Why tile_size is in the fingerprint: grids of equal aspect ratio are chosen by the image's area
    against tile_size^2, so the same image gets another tile count and its sample packs differently."""
    from megasail.data.images.tiling import num_image_tokens

    assert num_image_tokens(500, 500, 4, 1, 448) != num_image_tokens(500, 500, 4, 1, 224)


def test_state_is_kept_across_settings_that_do_not_move_samples(prefixes):
    loader = MultimodalDataLoader(make_config(prefixes), 0, 2)
    take(loader, 2 * PER_RANK_GLOBAL_BATCH)
    state = loader.state_dict()
    other = MultimodalDataLoader(make_config(prefixes, pad_token_id=0, micro_batch_size=2, balance_dp=False), 0, 2)
    other.load_state_dict(state)
    assert other.position == loader.position


def rows_of(batches: list[dict]) -> list[bytes]:
    return sorted(row.numpy().tobytes() for b in batches for row in b["input_ids"])


def plan_sequences(loader, position, rank, dp_size, count) -> list[tuple]:
    """(stage, chunk, pack, samples) of the next `count` micro-batches' sequences of one rank."""
    plans = micro_batch_plans(loader.curriculum, position, rank, dp_size, loader.cost_model)
    return [(s.stage, s.chunk, s.pack, tuple(zip(s.sources, s.samples, strict=True)))
            for plan in islice(plans, count) for s in plan.sequences]


def test_dp2_state_restores_at_dp1_with_the_same_samples(prefixes):
    config = make_config(prefixes)
    saved_after, total = 2, 5  # global batches; the stage boundary (after 3) falls after the restore
    reference_rows, reference_sequences = [], []
    for rank in (0, 1):
        loader = MultimodalDataLoader(config, rank, 2)
        reference_rows += rows_of(take(loader, total * PER_RANK_GLOBAL_BATCH))
        reference_sequences += plan_sequences(loader, LoaderPosition(), rank, 2, total * PER_RANK_GLOBAL_BATCH)
    before_rows, before_sequences, state = [], [], None
    for rank in (0, 1):
        loader = MultimodalDataLoader(config, rank, 2)
        before_rows += rows_of(take(loader, saved_after * PER_RANK_GLOBAL_BATCH))
        before_sequences += plan_sequences(loader, LoaderPosition(), rank, 2, saved_after * PER_RANK_GLOBAL_BATCH)
        state = loader.state_dict()
    single = MultimodalDataLoader(config, 0, 1)
    single.load_state_dict(state)
    after_count = (total - saved_after) * 2 * PER_RANK_GLOBAL_BATCH
    after_sequences = plan_sequences(single, single.position, 0, 1, after_count)
    after_rows = rows_of(take(single, after_count))
    assert single.position.global_batches == total
    assert sorted(before_sequences + after_sequences) == sorted(reference_sequences)
    assert sorted(before_rows + after_rows) == sorted(reference_rows)
    assert {s[0] for s in after_sequences} == {0, 1}  # the restored run crossed into stage b


def _dp2_resume(rank, world_size, prefixes, global_batches):
    from megatron.core import parallel_state as ps

    from megasail.data.loader.model_parallel import build_data_loader
    from megasail.runtime import initialize

    initialize(1, 1)
    assert ps.get_data_parallel_world_size() == 2 and ps.get_data_parallel_rank() == rank
    config = make_config(prefixes)
    n = global_batches * PER_RANK_GLOBAL_BATCH
    simulated = take(MultimodalDataLoader(config, rank, 2), 2 * n)
    first = build_data_loader(config)
    before = take(first, n)
    state = first.state_dict()
    resumed = build_data_loader(config)
    resumed.load_state_dict(state)
    for a, b in zip(simulated, before + take(resumed, n), strict=True):
        assert_same_batch(a, b)
    assert resumed.current_stage.name == "b"


@pytest.mark.distributed
def test_resume_with_two_gloo_ranks(prefixes):
    run_distributed_test(_dp2_resume, 2, prefixes, 2)


def test_sample_order_is_deterministic_and_seed_dependent(prefixes):
    def sequence_samples(seed):
        loader = MultimodalDataLoader(make_config(prefixes, seed=seed), 0, 1)
        plans = micro_batch_plans(loader.curriculum, LoaderPosition(), 0, 1, loader.cost_model)
        return [tuple(zip(p.sequences[0].sources, p.sequences[0].samples, strict=True)) for p in islice(plans, 8)]

    assert sequence_samples(3) == sequence_samples(3)
    assert sequence_samples(3) != sequence_samples(4)
    assert np.all(np.array([len(s) for s in sequence_samples(3)]) >= 1)
