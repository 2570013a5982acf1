"""The on-disk enums of a dataset prefix (docs/data_format.md), defined once for every layer.

csrc/shard_format.h and csrc/shard_writer.cpp hold the C++ writer's copy of these values.
"""

from __future__ import annotations

from enum import IntEnum


class SegmentMode(IntEnum):
    """int8 mode of each segment in PREFIX.idx."""

    PROMPT = 0  # text without loss
    TARGET = 1  # text with loss
    IMAGE = 2  # one token: the sample-local image ordinal, expanded by the reader


class ImageFormat(IntEnum):
    """u8 format of each image in PREFIX.img.idx (preprocessing stores JPEG as is, the rest as PNG)."""

    JPEG = 1
    PNG = 2
    OTHER = 3


IMAGE_FORMAT_NAMES = {f: f.name.lower() for f in ImageFormat}  # as inspect_dataset.py prints them
TOKEN_DTYPE_CODE = 4  # megatron-core DType.int32, the dtype byte of PREFIX.idx
