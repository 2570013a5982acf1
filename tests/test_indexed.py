"""IndexedMultimodalDataset: round trip, megatron-core agreement, manifest rule, counts, expansion."""

import json
import pickle
import warnings

import numpy as np
import pytest
from test_writer import random_samples, write

from megasail.data.format.reader import IncompleteDatasetError, IndexedMultimodalDataset
from megasail.data.format.writer import ShardWriter
from megasail.data.images.tiling import num_image_tokens, num_tiles

IMAGE_IDS = {"img_start": 151665, "img_end": 151666, "img_context": 151667}


def split_segments(sample: dict) -> list[np.ndarray]:
    return np.split(sample["tokens"], np.cumsum(sample["segment_lengths"])[:-1])


@pytest.fixture
def dataset(tmp_path):
    samples = random_samples(40, seed=21)
    prefix = tmp_path / "data"
    write(ShardWriter, prefix, samples)
    with open(f"{prefix}.manifest.json", "w") as f:
        json.dump({"format_version": 1, "image_token_ids": IMAGE_IDS}, f)
    return IndexedMultimodalDataset(prefix, verify=True), samples


def test_round_trip(dataset):
    ds, samples = dataset
    assert len(ds) == len(samples)
    assert ds.num_images == sum(len(s["images"]) for s in samples)
    for i in (0, 17, -1):
        got, want = ds[i], samples[i]
        assert got.index == i % len(samples) and got.source == want["source_id"]
        np.testing.assert_array_equal(got.segment_modes, want["segment_modes"])
        assert len(got.segment_tokens) == len(want["segment_lengths"])
        for a, b in zip(got.segment_tokens, split_segments(want), strict=True):
            np.testing.assert_array_equal(a, b)
        assert [bytes(im.data) for im in got.images] == want["images"]
        assert [(im.width, im.height, im.format) for im in got.images] == list(
            zip(want["widths"].tolist(), want["heights"].tolist(), want["formats"].tolist(), strict=True)
        )
        assert ds.image_sizes(i) == list(zip(want["widths"].tolist(), want["heights"].tolist(), strict=True))
    np.testing.assert_array_equal(ds.sources, [s["source_id"] for s in samples])
    with pytest.raises(IndexError):
        ds[len(samples)]


def test_megatron_core_reads_the_token_files(dataset):
    ds, samples = dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron-core warns about missing TE/apex on import
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    reference = IndexedDataset(ds.prefix, multimodal=True)
    segments = [seg for s in samples for seg in split_segments(s)]
    modes = np.concatenate([s["segment_modes"] for s in samples])
    assert len(reference) == len(segments)
    np.testing.assert_array_equal(
        reference.document_indices, np.cumsum([0] + [len(s["segment_lengths"]) for s in samples])
    )
    for k in range(len(segments)):
        tokens, mode = reference[k]
        np.testing.assert_array_equal(tokens, segments[k])
        assert mode == modes[k]


def test_manifest_is_required_unless_allowed(tmp_path):
    write(ShardWriter, tmp_path / "shard", random_samples(2))
    with pytest.raises(IncompleteDatasetError, match="manifest.json not found"):
        IndexedMultimodalDataset(tmp_path / "shard")
    ds = IndexedMultimodalDataset(tmp_path / "shard", allow_missing_manifest=True)
    assert len(ds) == 2 and ds.manifest is None
    with pytest.raises(IncompleteDatasetError, match="missing"):
        IndexedMultimodalDataset(tmp_path / "nothing", allow_missing_manifest=True)


def test_manifest_is_loaded(dataset):
    ds, _ = dataset
    assert ds.manifest["image_token_ids"] == IMAGE_IDS


@pytest.mark.parametrize("max_tiles,min_tiles", [(1, 1), (6, 1), (12, 2)])
def test_token_counts_agree_with_a_per_sample_loop(dataset, max_tiles, min_tiles):
    ds, samples = dataset
    expected = []
    for s in samples:
        text = int(sum(n for n, m in zip(s["segment_lengths"], s["segment_modes"], strict=True) if m != 2))
        images = sum(
            num_image_tokens(int(w), int(h), max_tiles, min_tiles)
            for w, h in zip(s["widths"], s["heights"], strict=True)
        )
        expected.append(text + images)
    np.testing.assert_array_equal(ds.token_counts(max_tiles, min_tiles=min_tiles), expected)
    assert ds.token_counts(max_tiles).dtype == np.int64


def test_expand_builds_image_slots_and_loss_mask(dataset):
    ds, samples = dataset
    for i in range(len(samples)):
        s, ids, mask = samples[i], [], []
        tiles = [num_tiles(int(w), int(h), 6) for w, h in zip(s["widths"], s["heights"], strict=True)]
        for mode, seg in zip(s["segment_modes"], split_segments(s), strict=True):
            if mode == 2:
                n = 256 * tiles[int(seg[0])]
                ids += [151665] + [151667] * n + [151666]
                mask += [False] * (n + 2)
            else:
                ids += seg.tolist()
                mask += [mode == 1] * len(seg)
        got = ds.expand(i, max_tiles=6)  # ids from the manifest
        assert got.input_ids.dtype == np.int32 and got.loss_mask.dtype == bool
        assert got.input_ids.tolist() == ids and got.loss_mask.tolist() == mask
        assert got.image_tiles == tiles
        assert len(got.input_ids) == ds.token_counts(6)[i]


def test_expand_needs_image_ids_without_manifest(tmp_path):
    samples = [s for s in random_samples(20, seed=4) if s["images"]][:1]
    write(ShardWriter, tmp_path / "s", samples)
    ds = IndexedMultimodalDataset(tmp_path / "s", allow_missing_manifest=True)
    with pytest.raises(ValueError, match="image token ids"):
        ds.expand(0, max_tiles=4)
    got = ds.expand(0, max_tiles=4, img_start_id=1, img_context_id=2, img_end_id=3)
    assert got.input_ids.tolist().count(2) == 256 * sum(got.image_tiles)


def test_verify_catches_corrupt_image_bytes(tmp_path):
    samples = [s for s in random_samples(20, seed=6) if s["images"]][:3]
    write(ShardWriter, tmp_path / "s", samples)
    with open(tmp_path / "s.img.bin", "r+b") as f:
        f.seek(len(samples[0]["images"][0]) - 1)  # last byte of sample 0's first image
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    ds = IndexedMultimodalDataset(tmp_path / "s", allow_missing_manifest=True)
    ds[0]  # not verified by default
    with pytest.raises(ValueError, match="sample 0, image 0: crc32 mismatch"):
        ds.sample(0, verify=True)
    ds.sample(1, verify=True)
    with pytest.raises(ValueError, match="sample 0"):
        ds.verify_all()


def test_empty_and_text_only_prefixes(tmp_path):
    write(ShardWriter, tmp_path / "empty", [])
    empty = IndexedMultimodalDataset(tmp_path / "empty", allow_missing_manifest=True)
    assert len(empty) == 0 and empty.token_counts(12).shape == (0,)
    text_only = [dict(tokens=[7, 8, 9], segment_lengths=[1, 2], segment_modes=[0, 1])]
    write(ShardWriter, tmp_path / "text", text_only)
    ds = IndexedMultimodalDataset(tmp_path / "text", allow_missing_manifest=True)
    assert ds.num_images == 0
    np.testing.assert_array_equal(ds.token_counts(12), [3])
    assert ds.expand(0, 12, 1, 2, 3).loss_mask.tolist() == [False, True, True]


def test_truncated_index_is_refused(tmp_path):
    write(ShardWriter, tmp_path / "s", random_samples(3))
    with open(tmp_path / "s.idx", "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="s.idx"):
        IndexedMultimodalDataset(tmp_path / "s", allow_missing_manifest=True)


def test_pickles_by_prefix_not_by_content(dataset):
    ds, samples = dataset
    blob = pickle.dumps(ds)
    assert len(blob) < 1000  # the mapped arrays are not copied into the pickle
    again = pickle.loads(blob)
    assert len(again) == len(samples) and again.verify and again.manifest == ds.manifest
    np.testing.assert_array_equal(again[5].segment_modes, samples[5]["segment_modes"])
