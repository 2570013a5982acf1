"""permute_indices: the seeded Feistel permutation of 0..n-1, C++ against its Python reference.

The statistical tests are deterministic (fixed seeds); their thresholds leave a wide margin for
the real construction and none for the planted faults named in each docstring.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from megasail.data.format import index_helpers
from megasail.data.format.index_helpers import permute_indices, permute_indices_ref

SEEDS = st.integers(min_value=0, max_value=2**64 - 1)
FAST = settings(max_examples=60, deadline=None)
STAT_SEEDS = np.random.default_rng(0).integers(0, 2**63, 4000).tolist()
STAT_SIZES = (3, 5, 7, 8, 11, 13, 16, 17, 40)  # block widths of 1, 2 and 3 bits per half, walked and exact


@FAST
@given(data=st.data(), n=st.integers(1, 5000), seed=SEEDS)
def test_cpp_equals_python_reference(data, n, seed):
    """Fails if the C++ and the reference differ anywhere (keys, rounds, block width, cycle-walking)."""
    positions = np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=64)), dtype=np.int64)
    got = permute_indices(positions, n, seed)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, permute_indices_ref(positions, n, seed))


@FAST
@given(data=st.data(), n=st.integers(1, 2**63 - 1), seed=SEEDS)
def test_cpp_equals_python_reference_for_huge_n(data, n, seed):
    """Fails if the wide-block arithmetic (half widths up to 32 bits) differs between the two, or
    if either materialises the order (n up to 2**63 - 1 would not fit in memory)."""
    positions = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=16)), dtype=np.int64)
    got = permute_indices(positions, n, seed)
    np.testing.assert_array_equal(got, permute_indices_ref(positions, n, seed))
    assert np.all((got >= 0) & (got < n))


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_every_n_gives_a_true_permutation(backend):
    """Fails without cycle-walking (values >= n appear) or with values folded by `% n` (repeats)."""
    for n in range(0, 300):
        for seed in (0, 1, 2**64 - 1):
            values = permute_indices(np.arange(n), n, seed, backend=backend)
            np.testing.assert_array_equal(np.sort(values), np.arange(n), err_msg=f"n={n} seed={seed}")


def test_seed_and_n_select_different_orders():
    """Fails if the seed or n is left out of the round keys, or the round function ignores its key
    (all seeds, or all n in one block width, would then share one order)."""
    n = 1000
    orders = {tuple(permute_indices(np.arange(n), n, seed)) for seed in range(20)}
    assert len(orders) == 20
    # n and n + 1 share a block; with independent keys their first values rarely agree
    a = permute_indices(np.arange(600), 1000, 7)
    b = permute_indices(np.arange(600), 1001, 7)
    assert np.mean(a == b) < 0.05


def _chi_square_p_values(n: int) -> tuple[float, float]:
    """p-values of (position -> value) and (value at 0, value at 1) counts over STAT_SEEDS."""
    position_value = np.zeros((n, n))
    first_two = np.zeros((n, n))
    positions = np.arange(n)
    for seed in STAT_SEEDS:
        values = permute_indices(positions, n, seed)
        position_value[positions, values] += 1
        first_two[values[0], values[1]] += 1
    expected = len(STAT_SEEDS) / n
    chi = ((position_value - expected) ** 2 / expected).sum()
    p_marginal = stats.chi2.sf(chi, (n - 1) ** 2)
    off_diagonal = ~np.eye(n, dtype=bool)
    expected = len(STAT_SEEDS) / (n * (n - 1))
    chi = ((first_two[off_diagonal] - expected) ** 2 / expected).sum()
    p_pairs = stats.chi2.sf(chi, n * (n - 1) - 1)
    return float(p_marginal), float(p_pairs)


@pytest.mark.parametrize("n", STAT_SIZES)
def test_permutations_look_uniform(n):
    """Over 4000 seeds, every position takes every value (and positions 0 and 1 every ordered pair of
    values) about equally often: chi-square p > 1e-3 (the real construction gives >= 0.02).
    Fails with FEISTEL_ROUNDS = 4 (8 of 9 sizes) or 6 (pairs p = 2e-5 at n = 8), with the round
    function ignoring its key, with the seed left out of the keys, and without cycle-walking."""
    p_marginal, p_pairs = _chi_square_p_values(n)
    assert p_marginal > 1e-3, f"position -> value counts not uniform for n={n}: p={p_marginal:.2g}"
    assert p_pairs > 1e-3, f"(value at 0, value at 1) counts not uniform for n={n}: p={p_pairs:.2g}"


def test_too_few_rounds_is_caught(monkeypatch):
    """The uniformity check itself can fail: with 4 rounds it rejects (guards against a check that
    passes everything, e.g. comparing counts with themselves)."""
    monkeypatch.setattr(index_helpers, "FEISTEL_ROUNDS", 4)
    p_marginal, p_pairs = _chi_square_p_values(5)
    assert min(p_marginal, p_pairs) < 1e-6


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_out_of_range_position_is_named(backend):
    """Fails if out-of-range positions are wrapped or clamped instead of refused, or if the message
    does not name the first bad position."""
    with pytest.raises(ValueError, match=r"position -1 \(entry 1\) is out of range \[0, 5\)"):
        permute_indices(np.array([3, -1, 9]), 5, 0, backend=backend)
    with pytest.raises(ValueError, match=r"position 5 \(entry 0\)"):
        permute_indices(np.array([5]), 5, 0, backend=backend)
    with pytest.raises(ValueError, match="n must be >= 0"):
        permute_indices(np.array([], dtype=np.int64), -1, 0, backend=backend)
    with pytest.raises(ValueError, match="seed"):
        permute_indices(np.array([0]), 5, -1, backend=backend)
    with pytest.raises(ValueError, match="integers"):
        permute_indices(np.array([0.5]), 5, 0, backend=backend)


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_shape_and_slices(backend):
    """A slice of positions gives the same values as the whole order; the shape is kept; n = 0
    with no positions gives an empty array. Fails if values depend on the batch they come in."""
    n, seed = 12345, 99
    whole = permute_indices(np.arange(n), n, seed, backend=backend)
    np.testing.assert_array_equal(
        permute_indices(np.arange(100, 200), n, seed, backend=backend), whole[100:200]
    )
    grid = np.arange(12).reshape(3, 4)
    assert permute_indices(grid, n, seed, backend=backend).shape == (3, 4)
    assert permute_indices(np.array([], dtype=np.int64), 0, seed, backend=backend).shape == (0,)


def test_cpp_releases_the_gil():
    """While one thread permutes 4M positions in C++, another thread keeps running Python code.
    Fails if the binding holds the GIL through the loop (the other thread then stalls for the
    whole call)."""
    import threading
    import time

    positions = np.arange(4_000_000, dtype=np.int64)
    done = threading.Event()
    ticks = 0

    def count():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    time.sleep(0.05)  # the counter is running before the call starts
    started, before = time.perf_counter(), ticks
    permute_indices(positions, 2**40, 5)
    seconds, during = time.perf_counter() - started, ticks - before
    done.set()
    counter.join()
    # a free counter ticks about once per 1-2 ms; a blocked one at most once or twice
    assert during >= max(5, seconds * 100), f"{during} ticks in {seconds:.2f} s: the GIL was held"
