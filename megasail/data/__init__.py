"""Data, in layers: format/ (the on-disk dataset), text/ (tokenizer, templates), images/ (tiling,
decode), loader/ (curriculum, packing, balancing, workers) and preprocess/ (raw data -> dataset).

Names resolve lazily, so preprocessing workers importing the tokenizer do not pay for torch or DALI.
"""

from importlib import import_module

_EXPORTS = {
    "MultimodalTokenizer": "text.tokenizer",
    "get_template": "text.template",
    "tile_grid": "images.tiling",
    "num_tiles": "images.tiling",
    "num_image_tokens": "images.tiling",
    "decode_tiles": "images.decode",
    "DecodeStats": "images.decode",
    "ImageDecodeError": "images.decode",
    "ShardWriter": "format.writer",
    "PyShardWriter": "format.writer",
    "merge_shards": "format.writer",
    "IndexedMultimodalDataset": "format.reader",
    "TokenizedSample": "format.reader",
    "pack_samples": "loader.packing",
    "collate_packed": "loader.packing",
    "DataConfig": "loader.config",
    "StageConfig": "loader.config",
    "SourceConfig": "loader.config",
    "MultimodalDataLoader": "loader.data_loader",
    "build_data_loader": "loader.model_parallel",
    "build_validation_loader": "loader.validation",
    "ValidationReader": "loader.validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megasail.data' has no attribute {name!r}")
    return getattr(import_module(f"megasail.data.{_EXPORTS[name]}"), name)
