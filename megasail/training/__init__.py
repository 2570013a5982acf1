"""Training: model chunks per pipeline stage, freezing and DDP wrapping, the forward step."""

from megasail.training.model_builder import build_model_chunks, freeze, wrap_ddp
from megasail.training.step import forward_step, masked_mean_loss

__all__ = ["build_model_chunks", "forward_step", "freeze", "masked_mean_loss", "wrap_ddp"]
