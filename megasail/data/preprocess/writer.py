"""The one place preprocessing touches the dataset builder (`megasail.data.builder`)."""

from __future__ import annotations

import numpy as np

from megasail.data.preprocess.samples import EncodedSample


def open_shard_writer(prefix: str, backend: str = "auto"):
    """A ShardWriter for `prefix`: the native one ("cpp"), the pure-Python one ("python"), or the
    native one when it is built ("auto"). Both write byte-identical files."""
    from megasail.data import builder

    if backend == "python":
        return builder.PyShardWriter(prefix)
    if backend == "cpp":
        return builder.ShardWriter(prefix)
    try:
        return builder.ShardWriter(prefix)
    except ImportError:  # native extension not built: same bytes, slower
        return builder.PyShardWriter(prefix)


def write_sample(writer, sample: EncodedSample, source_id: int) -> None:
    images = sample.images
    writer.add_sample(
        sample.tokens,
        sample.segment_lengths,
        sample.segment_modes,
        [im.data for im in images],
        np.asarray([im.width for im in images], dtype=np.uint32),
        np.asarray([im.height for im in images], dtype=np.uint32),
        np.asarray([im.format for im in images], dtype=np.uint8),
        source_id,
    )


def merge_shards(shard_prefixes: list[str], out_prefix: str) -> None:
    from megasail.data import builder

    builder.merge_shards(shard_prefixes, out_prefix)
