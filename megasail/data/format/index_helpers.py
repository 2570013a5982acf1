"""Index helpers over whole datasets: shuffled order, packing into sequences, weighted blending.

`permute_indices` gives the value at any position of a seeded permutation of 0..n-1 in O(1)
memory (a Feistel network with cycle-walking), so epoch orders need not be materialised.

Each helper has a C++ implementation (csrc/index_helpers.cpp, the default) and a readable
Python reference here (`*_ref`); the two agree bit for bit, which the tests check. Choose with
`backend="cpp"` or `backend="python"`.

Random numbers come from splitmix64: the k-th draw (k = 1, 2, ...) of seed s is
`mix(s + k * 0x9E3779B97F4A7C15 mod 2**64)`, so any language reproduces a shuffle exactly.
"""

from __future__ import annotations

import bisect

import numpy as np

SPLITMIX64_GAMMA = 0x9E3779B97F4A7C15
DEFAULT_PACK_WINDOW = (
    1024  # samples sorted together; gives >= 98% fill at 8192 (tests/test_native_helpers.py)
)
_U64 = (1 << 64) - 1


def splitmix64_draws(seed: int, count: int) -> np.ndarray:
    """The first `count` splitmix64 outputs of `seed` as uint64[count] (k = 1..count)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64 on purpose
        z = np.uint64(seed) + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(SPLITMIX64_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function (a bijection of uint64) applied element-wise; uint64 in, uint64 out."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed <= _U64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def shuffle_indices_ref(n: int, seed: int) -> np.ndarray:
    """Permutation of 0..n-1 as int64[n]: Fisher-Yates from the back, j = draw_k % (i + 1)."""
    seed = _check_seed(seed)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    perm = list(range(n))
    if n > 1:
        positions = np.arange(n - 1, 0, -1, dtype=np.uint64)  # i = n-1 .. 1 takes draw k = n-i
        picks = (splitmix64_draws(seed, n - 1) % (positions + np.uint64(1))).tolist()
        for i, j in zip(range(n - 1, 0, -1), picks, strict=True):
            perm[i], perm[j] = perm[j], perm[i]
    return np.array(perm, dtype=np.int64)


FEISTEL_ROUNDS = (
    12  # 4 suffice for wide blocks (Luby-Rackoff); tiny blocks need more (tests/test_permutation.py)
)


def feistel_keys(n: int, seed: int, rounds: int) -> np.ndarray:
    """Round keys uint64[rounds]: splitmix64 draws of `seed ^ mix64(n)`, so each n has its own order."""
    return splitmix64_draws(_check_seed(seed) ^ int(mix64(np.uint64(n))), rounds)


def _feistel_half_bits(n: int) -> int:
    """Bits per half of the smallest even-width block 4**h >= n (so 4**h < 4n: under 4 walks expected)."""
    return max(1, ((n - 1).bit_length() + 1) // 2)


def _check_positions(positions, n: int) -> np.ndarray:
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    positions = np.asarray(positions)
    if positions.size and not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"positions must be integers, got dtype {positions.dtype}")
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    bad = np.flatnonzero((positions.ravel() < 0) | (positions.ravel() >= n))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"position {int(positions.ravel()[i])} (entry {i}) is out of range [0, {n})")
    return positions


def permute_indices_ref(positions, n: int, seed: int, rounds: int | None = None) -> np.ndarray:
    """Value at each position of the seeded permutation of 0..n-1 (int64, the shape of `positions`).

    The permutation is a balanced Feistel network on blocks of 2h bits (4**h >= n), walked in
    cycles until the value falls inside [0, n): x = (L, R) with L the high h bits; each round
    i maps (L, R) -> (R, L ^ (mix64(R ^ key_i) & mask)). Every round is a bijection of the block,
    so the network is, and cycle-walking restricts it to a bijection of [0, n).
    """
    positions = _check_positions(positions, n)
    keys = feistel_keys(n, seed, FEISTEL_ROUNDS if rounds is None else rounds)
    h = np.uint64(_feistel_half_bits(int(n)))
    mask = np.uint64((1 << int(h)) - 1)
    x = positions.ravel().astype(np.uint64)
    walking = np.ones(x.shape, dtype=bool)  # every position takes at least one pass
    while walking.any():
        left, right = x[walking] >> h, x[walking] & mask
        for key in keys:
            left, right = right, left ^ (mix64(right ^ key) & mask)
        x[walking] = (left << h) | right
        walking &= x >= np.uint64(n)
    return x.astype(np.int64).reshape(positions.shape)


def _check_pack_lengths(lengths: np.ndarray, seq_length: int) -> None:
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    bad = np.flatnonzero((lengths > seq_length) | (lengths < 1))
    if bad.size:
        i = int(bad[0])
        if lengths[i] > seq_length:
            raise ValueError(f"sample {i} has {int(lengths[i])} tokens, more than seq_length {seq_length}")
        raise ValueError(f"sample {i} has length {int(lengths[i])} (must be >= 1)")


def pack_samples_ref(lengths, seq_length: int, seed: int, window: int = DEFAULT_PACK_WINDOW):
    """Pack samples into sequences of at most seq_length tokens without splitting any.

    Args:
        lengths: int64[N] token count of each sample, each in 1..seq_length.
        seq_length: tokens per packed sequence.
        seed: shuffle seed (see module docstring).
        window: samples sorted together (longest first) before best-fit placement.

    Returns:
        (pack_offsets int64[P+1], order int64[N]): pack p holds samples
        order[pack_offsets[p]:pack_offsets[p+1]]; every sample appears exactly once.

    Algorithm: shuffle; cut into windows of `window` samples; sort each window longest first
    (stable); put each sample into the open pack with the least room that still fits it (the
    most recently filled among equals), or open a new pack. Packs stay open across windows until
    full. Packs come out in opening order, samples in placement order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    _check_pack_lengths(lengths, seq_length)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    order = shuffle_indices_ref(len(lengths), seed).tolist()
    length_of = lengths.tolist()
    members: list[list[int]] = []  # samples of each pack, in placement order
    packs_with_room: dict[int, list[int]] = {}  # remaining room -> packs (last is most recent)
    rooms: list[int] = []  # sorted keys of packs_with_room
    for start in range(0, len(order), window):
        for s in sorted(order[start : start + window], key=lambda s: -length_of[s]):
            need = length_of[s]
            pos = bisect.bisect_left(rooms, need)
            if pos == len(rooms):
                pack, room = len(members), seq_length
                members.append([])
            else:
                room = rooms[pos]
                pack = packs_with_room[room].pop()
                if not packs_with_room[room]:
                    del packs_with_room[room]
                    rooms.pop(pos)
            members[pack].append(s)
            left = room - need
            if left > 0:
                if left not in packs_with_room:
                    bisect.insort(rooms, left)
                    packs_with_room[left] = []
                packs_with_room[left].append(pack)
    offsets = np.zeros(len(members) + 1, dtype=np.int64)
    np.cumsum([len(m) for m in members], out=offsets[1:])
    flat = [s for m in members for s in m]
    return offsets, np.array(flat, dtype=np.int64)


def _check_blend(weights: np.ndarray, sizes: np.ndarray, num_samples: int) -> None:
    if weights.ndim != 1 or weights.shape != sizes.shape or weights.size == 0:
        raise ValueError("weights and sizes must be non-empty, one-dimensional and of equal length")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")


def blend_indices_ref(weights, num_samples: int, sizes):
    """Interleave K datasets by weight.

    Args:
        weights: float64[K], >= 0, normalised here to sum to 1.
        num_samples: length n of the blended stream.
        sizes: int64[K] samples in each dataset (>= 1 where the weight is positive).

    Returns:
        (dataset_index int32[n], dataset_sample_index int64[n]). Step i takes the dataset with the
        largest `w_k * (i + 1) - count_k` (lowest k on ties; megatron-core's rule). After every
        step no dataset is a whole sample ahead of its target `w_k * (i + 1)`; with two datasets
        none is a whole sample behind either, with more it can fall slightly further behind
        (measured at most 1.2 samples for K <= 32). A dataset's c-th pick reads its sample
        c % sizes[k]: past its end it starts a new epoch in the same order.
    """
    weights = np.asarray(weights, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    _check_blend(weights, sizes, num_samples)
    w = weights.tolist()
    total = 0.0
    for k, wk in enumerate(w):
        if not np.isfinite(wk) or wk < 0:
            raise ValueError(f"weight of dataset {k} must be finite and >= 0")
        if wk > 0 and sizes[k] < 1:
            raise ValueError(f"dataset {k} has positive weight but no samples")
        total += wk  # left-to-right sum, as the C++ does
    if not total > 0:
        raise ValueError("blend weights sum to zero")
    w = [wk / total for wk in w]
    size_of = sizes.tolist()
    counts = [0] * len(w)
    dataset_index = np.empty(num_samples, dtype=np.int32)
    sample_index = np.empty(num_samples, dtype=np.int64)
    for i in range(num_samples):
        step = float(i + 1)
        best, best_deficit = 0, w[0] * step - counts[0]
        for k in range(1, len(w)):
            deficit = w[k] * step - counts[k]
            if deficit > best_deficit:
                best, best_deficit = k, deficit
        dataset_index[i] = best
        sample_index[i] = counts[best] % size_of[best]
        counts[best] += 1
    return dataset_index, sample_index


def _check_backend(backend: str) -> None:
    if backend not in ("cpp", "python"):
        raise ValueError(f"backend must be 'cpp' or 'python', got {backend!r}")


def shuffle_indices(n: int, seed: int, backend: str = "cpp") -> np.ndarray:
    """Seeded permutation of 0..n-1 as int64[n] (see shuffle_indices_ref)."""
    _check_backend(backend)
    if backend == "python":
        return shuffle_indices_ref(n, seed)
    from megasail.data.format.native import C

    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return C.shuffle_indices(int(n), _check_seed(seed))


def permute_indices(positions, n: int, seed: int, backend: str = "cpp") -> np.ndarray:
    """Value at each position of the seeded permutation of 0..n-1: int64 of the shape of `positions`.

    positions: integers in [0, n) (ValueError names the first one outside). O(1) memory whatever n
    is, so `permute_indices(np.arange(a, b), n, seed)` reads a slice of an epoch's order without
    building the order; see permute_indices_ref for the construction.
    """
    _check_backend(backend)
    if backend == "python":
        return permute_indices_ref(positions, n, seed)
    from megasail.data.format.native import C

    positions = _check_positions(positions, n)
    out = C.permute_indices(positions.ravel(), int(n), _check_seed(seed), FEISTEL_ROUNDS)
    return out.reshape(positions.shape)


def pack_samples(
    lengths, seq_length: int, seed: int, window: int = DEFAULT_PACK_WINDOW, backend: str = "cpp"
):
    """(pack_offsets int64[P+1], order int64[N]) packing of samples into seq_length (see pack_samples_ref)."""
    _check_backend(backend)
    if backend == "python":
        return pack_samples_ref(lengths, seq_length, seed, window)
    from megasail.data.format.native import C

    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.ndim != 1:
        raise ValueError("lengths must be one-dimensional")
    return C.pack_samples(lengths, int(seq_length), _check_seed(seed), int(window))


def blend_indices(weights, num_samples: int, sizes, backend: str = "cpp"):
    """(dataset_index int32[n], dataset_sample_index int64[n]) weighted interleaving (see blend_indices_ref)."""
    _check_backend(backend)
    if backend == "python":
        return blend_indices_ref(weights, num_samples, sizes)
    from megasail.data.format.native import C

    weights = np.ascontiguousarray(weights, dtype=np.float64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    _check_blend(weights, sizes, num_samples)
    return C.blend_indices(weights, int(num_samples), sizes)
