"""pack_samples never splits or drops a sample; collation equals each sample run alone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megasail.data.format.reader import TokenizedSample
from megasail.data.loader.packing import (
    PackedSequence,
    check_image_tokens,
    collate_packed,
    pack_samples,
    packing_efficiency,
)
from megasail.models.packed_attention import block_causal_mask

PAD = 0
IMG_CONTEXT = 151667


def load_bench_loader():
    path = Path(__file__).resolve().parents[1] / "tools" / "bench_loader.py"
    spec = importlib.util.spec_from_file_location("bench_loader", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@st.composite
def lengths_and_seq_length(draw):
    seq_length = draw(st.integers(1, 300))
    lengths = draw(st.lists(st.integers(1, seq_length), min_size=0, max_size=200))
    return np.array(lengths, dtype=np.int64), seq_length


@settings(max_examples=150, deadline=None)
@given(lengths_and_seq_length(), st.integers(0, 2**64 - 1), st.sampled_from(["cpp", "python"]))
def test_every_sample_once_whole_and_within_seq_length(case, seed, backend):
    lengths, seq_length = case
    groups = pack_samples(lengths, seq_length, seed=seed, window=16, backend=backend)
    members = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    assert sorted(members.tolist()) == list(range(len(lengths)))  # none dropped, none twice
    assert all(len(g) >= 1 and lengths[g].sum() <= seq_length for g in groups)  # whole samples that fit
    again = pack_samples(lengths, seq_length, seed=seed, window=16, backend=backend)
    assert [g.tolist() for g in again] == [g.tolist() for g in groups]  # deterministic from the seed


@settings(max_examples=40, deadline=None)
@given(lengths_and_seq_length(), st.integers(0, 2**32))
def test_cpp_equals_python_reference(case, seed):
    lengths, seq_length = case
    cpp = pack_samples(lengths, seq_length, seed=seed, window=8, backend="cpp")
    ref = pack_samples(lengths, seq_length, seed=seed, window=8, backend="python")
    assert [g.tolist() for g in cpp] == [g.tolist() for g in ref]


def test_over_long_sample_is_an_error_naming_it():
    with pytest.raises(ValueError, match="sample 2 has 513 tokens, more than seq_length 512"):
        pack_samples(np.array([10, 20, 513, 5]), 512)


def test_efficiency_at_8192_on_the_benchmark_mix():
    bench = load_bench_loader()
    lengths, _ = bench.realistic_length_mix(20_000, seed=1, max_length=8192)
    groups = pack_samples(lengths, 8192, seed=3)
    assert packing_efficiency(lengths, groups, 8192) >= 0.98
    one_chunk = pack_samples(lengths[:8192], 8192, seed=4)  # the loader packs chunk by chunk
    assert packing_efficiency(lengths[:8192], one_chunk, 8192) >= 0.98


# ---- collation ----
def random_sample(rng, length: int, tiles: list[int]) -> TokenizedSample:
    """Text, then each image as <img> + 256*tiles context + </img>; loss on a random suffix."""
    parts = [rng.integers(1, 1000, size=max(1, length - sum(256 * t + 2 for t in tiles)))]
    for t in tiles:
        parts.append(np.array([151665] + [IMG_CONTEXT] * (256 * t) + [151666]))
    ids = np.concatenate(parts).astype(np.int32)
    mask = np.zeros(len(ids), bool)
    mask[int(rng.integers(0, len(ids))):] = True
    return TokenizedSample(ids, mask, tiles)


def alone(sample: TokenizedSample) -> dict:
    """One sample as its own unpadded batch, built without any packing code."""
    n = len(sample.input_ids)
    ids = torch.tensor(sample.input_ids, dtype=torch.int64)
    labels = torch.cat([ids[1:], torch.tensor([PAD])])
    loss = torch.tensor(np.append(sample.loss_mask[1:], False), dtype=torch.float32)
    causal_masked_out = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return {"input_ids": ids, "labels": labels, "loss_mask": loss, "position_ids": torch.arange(n),
            "masked": causal_masked_out}


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 3))
def test_collation_equals_each_sample_alone(seed, rows):
    rng = np.random.default_rng(seed)
    seq_length = 1200
    sequences = []
    for _ in range(rows):
        samples, used = [], 0
        while True:
            tiles = [int(t) for t in rng.integers(1, 3, size=int(rng.integers(0, 2)))]
            length = int(rng.integers(1, 80)) + sum(256 * t + 2 for t in tiles)
            if used + length > seq_length:
                break
            samples.append(random_sample(rng, length, tiles))
            used += length
        pixels = [torch.full((t, 3, 4, 4), float(k)) for k, s in enumerate(samples) for t in s.image_tiles]
        sequences.append(PackedSequence(samples, pixels))
    batch = collate_packed(sequences, seq_length, PAD, img_context_id=IMG_CONTEXT)
    boundaries = batch["cu_seqlens"].tolist()
    assert boundaries[0] == 0 and boundaries[-1] == rows * seq_length
    assert "attention_mask" not in batch  # the loader ships cu_seqlens; the mask is made on the device
    attention_mask = block_causal_mask(batch["cu_seqlens"], rows, seq_length)
    for row, sequence in enumerate(sequences):
        at = 0
        for sample in sequence.samples:
            ref, n = alone(sample), len(sample.input_ids)
            for key in ("input_ids", "labels", "loss_mask", "position_ids"):
                assert torch.equal(batch[key][row, at : at + n], ref[key]), key
            block = attention_mask[row, 0]
            assert torch.equal(block[at : at + n, at : at + n], ref["masked"])
            assert block[at : at + n, :at].all() and block[at : at + n, at + n :].all()  # sees no other sample
            assert row * seq_length + at in boundaries
            at += n
        assert (batch["input_ids"][row, at:] == PAD).all() and (batch["loss_mask"][row, at:] == 0).all()
        assert int(batch["num_samples"][row]) == len(sequence.samples)
    pixels = [p for s in sequences for p in s.pixels]
    assert (batch["pixel_values"] is None) == (not pixels)
    if pixels:
        assert torch.equal(batch["pixel_values"], torch.cat(pixels))
        assert int((batch["input_ids"] == IMG_CONTEXT).sum()) == 256 * batch["pixel_values"].shape[0]


def test_packed_attention_equals_each_sample_run_alone():
    """Scaled dot-product attention over a packed row with the mask made from its cu_seqlens == each
    sample alone, causal."""
    rng = np.random.default_rng(0)
    lengths = [5, 9, 3]
    samples = [TokenizedSample(rng.integers(1, 50, n).astype(np.int32), np.ones(n, bool), []) for n in lengths]
    batch = collate_packed([PackedSequence(samples)], 20, PAD)
    embed = torch.nn.Embedding(60, 8)
    with torch.no_grad():
        x = embed(batch["input_ids"])[:, None]  # [1, 1, s, 8]
        packed = torch.nn.functional.scaled_dot_product_attention(x, x, x, attn_mask=~block_causal_mask(batch["cu_seqlens"], 1, 20))
        at = 0
        for sample in samples:
            y = embed(torch.tensor(sample.input_ids, dtype=torch.int64))[None, None]
            ref = torch.nn.functional.scaled_dot_product_attention(y, y, y, is_causal=True)
            torch.testing.assert_close(packed[0, 0, at : at + len(sample.input_ids)], ref[0, 0])
            at += len(sample.input_ids)


def test_image_token_count_must_equal_tiles():
    good = TokenizedSample(np.array([1, 151665] + [IMG_CONTEXT] * 512 + [151666], np.int32), np.ones(515, bool), [2])
    check_image_tokens(good, IMG_CONTEXT)
    bad = TokenizedSample(good.input_ids, good.loss_mask, [3])
    with pytest.raises(AssertionError, match="512 <IMG_CONTEXT> tokens"):
        collate_packed([PackedSequence([bad])], 600, PAD, img_context_id=IMG_CONTEXT)
    with pytest.raises(AssertionError, match="decoded tiles"):
        collate_packed([PackedSequence([good], [torch.zeros(1, 3, 2, 2)])], 600, PAD)


def test_block_causal_mask_small_case():
    expected = torch.tensor([[0, 1, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    assert torch.equal(block_causal_mask(torch.tensor([0, 2, 3], dtype=torch.int32), 1, 3)[0, 0], expected)
