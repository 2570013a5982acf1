"""C++ index helpers (shuffle, pack, blend) against their Python references and their contracts."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megasail.data.format.index_helpers import (
    blend_indices,
    blend_indices_ref,
    pack_samples,
    pack_samples_ref,
    shuffle_indices,
    shuffle_indices_ref,
    splitmix64_draws,
)

SEEDS = st.integers(min_value=0, max_value=2**64 - 1)
FAST = settings(max_examples=60, deadline=None)


def splitmix64_scalar(seed: int, count: int) -> list[int]:
    """Independent big-int splitmix64 (Vigna's splitmix64.c) for checking the vectorised one."""
    mask, state, out = 2**64 - 1, seed, []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(z ^ (z >> 31))
    return out


def test_splitmix64_matches_published_outputs_for_seed_zero():
    # first outputs of splitmix64.c started from x = 0
    assert splitmix64_draws(0, 3).tolist() == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


@FAST
@given(seed=SEEDS, count=st.integers(0, 50))
def test_splitmix64_vectorised_equals_scalar(seed, count):
    assert splitmix64_draws(seed, count).tolist() == splitmix64_scalar(seed, count)


def test_shuffle_follows_fisher_yates_spec():
    n, seed = 9, 12345
    expected = list(range(n))
    for k, draw in enumerate(splitmix64_scalar(seed, n - 1), start=1):
        i = n - k
        j = draw % (i + 1)
        expected[i], expected[j] = expected[j], expected[i]
    assert shuffle_indices(n, seed).tolist() == expected
    assert shuffle_indices(n, seed, backend="python").tolist() == expected


@FAST
@given(n=st.integers(0, 3000), seed=SEEDS)
def test_shuffle_cpp_equals_python_and_is_a_permutation(n, seed):
    got = shuffle_indices(n, seed)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, shuffle_indices_ref(n, seed))
    np.testing.assert_array_equal(np.sort(got), np.arange(n))


def test_shuffle_rejects_bad_arguments():
    with pytest.raises(ValueError):
        shuffle_indices(-1, 0)
    with pytest.raises(ValueError):
        shuffle_indices(5, -1)
    with pytest.raises(ValueError):
        shuffle_indices(5, 0, backend="rust")


def check_packing(lengths, seq_length, offsets, order):
    """Contracts of a packing, checked without the packer's own code."""
    lengths = np.asarray(lengths)
    assert offsets[0] == 0 and offsets[-1] == len(lengths)
    assert np.all(np.diff(offsets) >= 1), "empty pack"
    np.testing.assert_array_equal(np.sort(order), np.arange(len(lengths)))  # every sample exactly once
    pack_tokens = np.add.reduceat(lengths[order], offsets[:-1]) if len(lengths) else np.zeros(0)
    assert np.all(pack_tokens <= seq_length)


@FAST
@given(data=st.data(), seq_length=st.integers(1, 300), seed=SEEDS, window=st.integers(1, 40))
def test_pack_cpp_equals_python_and_keeps_contracts(data, seq_length, seed, window):
    lengths = data.draw(st.lists(st.integers(1, seq_length), max_size=400))
    offsets, order = pack_samples(lengths, seq_length, seed, window=window)
    ref_offsets, ref_order = pack_samples_ref(lengths, seq_length, seed, window=window)
    np.testing.assert_array_equal(offsets, ref_offsets)
    np.testing.assert_array_equal(order, ref_order)
    check_packing(lengths, seq_length, offsets, order)


@FAST
@given(
    lengths=st.lists(st.integers(1, 100), min_size=1, max_size=50),
    bad=st.data(),
    backend=st.sampled_from(["cpp", "python"]),
)
def test_pack_names_the_over_long_sample(lengths, bad, backend):
    i = bad.draw(st.integers(0, len(lengths) - 1))
    lengths[i] = 101
    lengths[i + 1 :] = [min(x, 100) for x in lengths[i + 1 :]]
    with pytest.raises(ValueError, match=rf"sample {i} has 101 tokens, more than seq_length 100"):
        pack_samples(lengths, 100, seed=0, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_pack_rejects_empty_samples(backend):
    with pytest.raises(ValueError, match="sample 2 has length 0"):
        pack_samples([5, 6, 0, 7], 10, seed=0, backend=backend)


def realistic_vlm_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """Caption samples (300-3000 text tokens, 1 or 3-13 tiles of 258), text-only SFT, multi-tile documents."""
    kind = rng.choice(3, size=n, p=[0.6, 0.25, 0.15])
    caption_tiles = rng.choice([1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], n)
    text = np.select(
        [kind == 0, kind == 1],
        [rng.integers(300, 3001, n), rng.integers(30, 1500, n)],
        rng.integers(500, 2500, n),
    )
    tiles = np.select([kind == 0, kind == 1], [caption_tiles, 0], rng.choice([7, 9, 13], n))
    return (text + tiles * 258).astype(np.int64)


def test_pack_fills_98_percent_at_8192_on_a_vlm_mix():
    lengths = realistic_vlm_lengths(100_000, np.random.default_rng(0))
    offsets, order = pack_samples(lengths, 8192, seed=7)
    check_packing(lengths, 8192, offsets, order)
    efficiency = lengths.sum() / ((len(offsets) - 1) * 8192)
    assert efficiency >= 0.98, efficiency


def test_pack_is_deterministic_and_seed_dependent():
    lengths = realistic_vlm_lengths(2000, np.random.default_rng(1))
    a, b, c = (pack_samples(lengths, 8192, seed) for seed in (3, 3, 4))
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


WEIGHTS = st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=8).filter(lambda w: sum(w) > 0)


@FAST
@given(weights=WEIGHTS, n=st.integers(0, 2000), data=st.data())
def test_blend_cpp_equals_python_and_keeps_proportions(weights, n, data):
    sizes = data.draw(st.lists(st.integers(1, 50), min_size=len(weights), max_size=len(weights)))
    dataset_index, sample_index = blend_indices(weights, n, sizes)
    ref_index, ref_sample = blend_indices_ref(weights, n, sizes)
    assert dataset_index.dtype == np.int32 and sample_index.dtype == np.int64
    np.testing.assert_array_equal(dataset_index, ref_index)
    np.testing.assert_array_equal(sample_index, ref_sample)
    # after every step i no dataset is a whole sample ahead of w_k * (i + 1); with two datasets
    # none is a whole sample behind either (their deviations sum to zero)
    w = np.asarray(weights) / sum(weights)
    counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[dataset_index], axis=0)
    targets = np.arange(1, n + 1)[:, None] * w[None, :]
    assert np.all(counts - targets < 1 + 1e-9)
    if len(weights) <= 2:
        assert np.all(targets - counts < 1 + 1e-9)
    # each dataset is read in order, wrapping at its size (a new epoch)
    for k, size in enumerate(sizes):
        picked = sample_index[dataset_index == k]
        np.testing.assert_array_equal(picked, np.arange(len(picked)) % size)


@FAST
@given(w=st.floats(0.01, 100.0), n=st.integers(1, 3000))
def test_blend_two_datasets_stays_within_one_sample(w, n):
    dataset_index, _ = blend_indices([w, 1.0], n, [7, 3])
    share = w / (w + 1.0)
    taken = np.cumsum(dataset_index == 0)
    assert np.all(np.abs(taken - share * np.arange(1, n + 1)) < 1 + 1e-9)


def test_blend_never_picks_a_zero_weight_dataset():
    dataset_index, _ = blend_indices([0.0, 1.0, 3.0], 1000, [0, 10, 10])
    assert set(dataset_index.tolist()) == {1, 2}
    assert np.sum(dataset_index == 2) == 750


@pytest.mark.parametrize("backend", ["cpp", "python"])
@pytest.mark.parametrize(
    "weights,sizes,match",
    [
        ([0.0, 0.0], [1, 1], "sum to zero"),
        ([1.0, -1.0], [1, 1], "dataset 1"),
        ([1.0, float("nan")], [1, 1], "dataset 1"),
        ([1.0, 1.0], [5, 0], "dataset 1 has positive weight but no samples"),
        ([1.0], [1, 2], "equal length"),
    ],
)
def test_blend_rejects_bad_weights(backend, weights, sizes, match):
    with pytest.raises(ValueError, match=match):
        blend_indices(weights, 10, sizes, backend=backend)
