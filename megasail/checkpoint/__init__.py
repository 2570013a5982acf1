"""The on-disk checkpoint: megatron-core ``dist_checkpointing`` (torch_dist) with megasail.json and atomic
publishing. Imported by training, convert, inference and evaluation; imports none of them (tests/test_layers.py).

- layout.py: step dirs, the marker, the latest and the published steps (reads only)
- meta.py: megasail.json as ``CheckpointMeta``, ``read_meta``, FORMAT_VERSION
- publish.py: tmp dir, fsync, rename, marker; prune and supersede (every write to a checkpoint root)
- sharded.py: the sharded state dicts of model, RNG and the sharding options of the optimizer's
- save.py / load.py: a run's save (sync or async) and its load at any TP/PP/DP/VPP layout, with key checks
- tensors.py: whole tensors of any layout without a model (``DistSource``), damaged-shard detection
- streaming.py: a checkpoint written tensor by tensor on one process (the HuggingFace converter's)
- compat.py: the private torch / megatron-core APIs the above rely on, checked
- errors.py: ``CheckpointError`` and its kinds

docs/checkpoints.md describes the files. layout, meta, publish and errors import no torch: the
rest (megatron's dist_checkpointing is slow to import) loads on first use of one of its names.
"""

from megasail.checkpoint.errors import CheckpointCorruptError, CheckpointError, CheckpointMismatchError
from megasail.checkpoint.layout import (
    MARKER,
    META,
    latest_checkpoint,
    published_steps,
    require_checkpoint,
    step_dir,
    steps_after,
)
from megasail.checkpoint.meta import FORMAT_VERSION, CheckpointMeta, read_meta, utc_now
from megasail.checkpoint.publish import prune, supersede

# name -> submodule, imported on first access (PEP 562)
_LAZY = {
    "save_checkpoint": "save",
    "finalize_async_saves": "save",
    "PAUSE_ENV": "save",
    "load_checkpoint": "load",
    "OPTIMIZER_SHARDING": "sharded",
    "sharding_metadata": "sharded",
    "model_sharded_state_dict": "sharded",
    "rng_sharded_object": "sharded",
    "DistSource": "tensors",
    "short_shard_files": "tensors",
    "save_streamed": "streaming",
}

__all__ = [
    "FORMAT_VERSION",
    "MARKER",
    "META",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMeta",
    "CheckpointMismatchError",
    "latest_checkpoint",
    "prune",
    "published_steps",
    "read_meta",
    "require_checkpoint",
    "step_dir",
    "steps_after",
    "supersede",
    "utc_now",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"megasail.checkpoint.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'megasail.checkpoint' has no attribute {name!r}")
