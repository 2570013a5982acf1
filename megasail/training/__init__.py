"""Training: model chunks per pipeline stage, freezing and DDP wrapping, the forward step."""

from megasail.training.model_builder import build_model_chunks, freeze, wrap_ddp
from megasail.training.step import batch_to_device, forward_step, masked_loss_sum, reported_loss

__all__ = ["batch_to_device", "build_model_chunks", "forward_step", "freeze", "masked_loss_sum", "reported_loss",
           "wrap_ddp"]
