"""HuggingFace <-> megasail checkpoint conversion."""

from megasail.convert.hf_internvl import (
    from_te_layout,
    fuse_qkv,
    hf_to_megasail,
    megasail_to_hf,
    model_config_from_hf,
    remote_code_to_transformers,
    split_qkv,
    to_te_layout,
    to_transformers_names,
)

__all__ = ["from_te_layout", "fuse_qkv", "hf_to_megasail", "megasail_to_hf", "model_config_from_hf",
           "remote_code_to_transformers", "split_qkv", "to_te_layout", "to_transformers_names"]
