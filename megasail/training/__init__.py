"""Training: model chunks per pipeline stage, freezing and DDP wrapping, the forward step, the loop.

``pretrain(cfg)`` (megasail.training.loop) is what ``pretrain_vlm.py`` runs; it is imported lazily
so that config tools importing this package do not pull in the whole training stack.
"""

from megasail.training.model_builder import build_model_chunks, freeze, wrap_ddp
from megasail.training.step import batch_to_device, forward_step, masked_loss_sum, reported_loss

__all__ = [
    "TrainingDiverged",
    "batch_to_device",
    "build_model_chunks",
    "forward_step",
    "freeze",
    "masked_loss_sum",
    "pretrain",
    "reported_loss",
    "wrap_ddp",
]


def __getattr__(name):
    if name in ("pretrain", "TrainingDiverged"):
        from megasail.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'megasail.training' has no attribute {name!r}")
