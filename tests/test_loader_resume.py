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


def global_batch_rows(per_rank: list[list[dict]], micro_batches: int) -> list[list[bytes]]:
    """Per global batch (in order): its rows over all ranks, sorted (DP placement within a step is free).
    per_rank[r] = rank r's micro-batches in order; `micro_batches` of them make one global batch."""
    count = len(per_rank[0]) // micro_batches
    return [sorted(row.numpy().tobytes() for batches in per_rank
                   for b in batches[g * micro_batches : (g + 1) * micro_batches] for row in b["input_ids"])
            for g in range(count)]


def test_dp2_state_restores_at_dp1_with_the_same_samples(prefixes):
    """Fails if a DP=2 position restores at DP=1 anywhere but the next global batch, or if DP=1 cuts its
    global batches differently: compared per global batch, in order (not as one sorted bag)."""
    config = make_config(prefixes)
    saved_after, total = 2, 5  # global batches; the stage boundary falls after the restore
    reference = global_batch_rows([take(MultimodalDataLoader(config, r, 2), total * PER_RANK_GLOBAL_BATCH)
                                   for r in (0, 1)], PER_RANK_GLOBAL_BATCH)
    first = [MultimodalDataLoader(config, r, 2) for r in (0, 1)]
    before = global_batch_rows([take(loader, saved_after * PER_RANK_GLOBAL_BATCH) for loader in first],
                               PER_RANK_GLOBAL_BATCH)
    single = MultimodalDataLoader(config, 0, 1)
    single.load_state_dict(first[0].state_dict())
    stages = []
    after_batches = []
    for _ in range(total - saved_after):
        after_batches += single.next_step()
        stages.append(single.current_stage.name)
    after = global_batch_rows([after_batches], 2 * PER_RANK_GLOBAL_BATCH)
    assert single.position.global_batches == total
    assert before == reference[:saved_after]
    assert after == reference[saved_after:]
    assert stages[-1] == "b"  # the restored run crossed into stage b


def test_resume_at_a_stage_boundary_with_workers_and_micro_batches(prefixes):
    """Save exactly after the global batch that ends stage a, with 2 worker processes and 2 sequences a
    micro-batch; the resumed loader's next global batches equal an uninterrupted run's. Fails if the
    position saved at the boundary is not the next stage's start (e.g. the stage switch is applied late)."""
    config = make_config(prefixes, num_workers=2, micro_batch_size=2)
    straight = MultimodalDataLoader(config, 1, 2)
    steps = [straight.next_step() for _ in range(5)]
    first = MultimodalDataLoader(config, 1, 2)
    boundary = None
    for g in range(5):
        first.next_step()
        if first.current_stage.name == "b":
            boundary = g + 1
            break
    assert boundary is not None and 1 < boundary < 5
    state = first.state_dict()
    assert state["position"]["stage"] == 1 and state["position"]["chunk"] == 0 and state["position"]["pack"] == 0
    first.close()
    resumed = MultimodalDataLoader(config, 1, 2)
    resumed.load_state_dict(state)
    for g in range(boundary, 5):
        for a, b in zip(steps[g], resumed.next_step(), strict=True):
            assert_same_batch(a, b)
    resumed.close()
    straight.close()


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
