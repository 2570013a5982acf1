"""Data: tokenizer and templates, tiling and decoding, the indexed dataset, packing and the loader.

Names resolve lazily, so preprocessing workers importing the tokenizer do not pay for torch or DALI.
"""

from importlib import import_module

_EXPORTS = {
    "MultimodalTokenizer": "tokenizer",
    "get_template": "template",
    "tile_grid": "tiling",
    "num_tiles": "tiling",
    "num_image_tokens": "tiling",
    "decode_tiles": "decode",
    "DecodeStats": "decode",
    "ImageDecodeError": "decode",
    "ShardWriter": "builder",
    "PyShardWriter": "builder",
    "merge_shards": "builder",
    "IndexedMultimodalDataset": "indexed",
    "TokenizedSample": "indexed",
    "pack_samples": "packing",
    "collate_packed": "packing",
    "DataConfig": "config",
    "StageConfig": "config",
    "SourceConfig": "config",
    "MultimodalDataLoader": "loader",
    "build_data_loader": "loader_broadcast",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megasail.data' has no attribute {name!r}")
    return getattr(import_module(f"megasail.data.{_EXPORTS[name]}"), name)
