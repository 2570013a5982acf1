"""One training step's pieces on megatron's pipeline schedules: masked loss and the forward step."""

from __future__ import annotations

from functools import partial

import torch

BATCH_KEYS = ("input_ids", "position_ids", "labels", "loss_mask", "pixel_values", "attention_mask")


def masked_mean_loss(loss_mask_bs: torch.Tensor, losses_bs: torch.Tensor):
    """Mean of per-token losses over the tokens that count (assistant / caption tokens).

    Returns (loss, logs) as megatron's schedules expect from a loss function.
    """
    mask = loss_mask_bs.to(torch.float32).reshape(-1)
    losses = losses_bs.to(torch.float32).reshape(-1)
    n_tokens = mask.sum()
    loss = (losses * mask).sum() / n_tokens.clamp(min=1.0)
    return loss, {"lm loss": loss.detach().clone(), "tokens": n_tokens.detach().clone()}


def forward_step(data_iterator, model):
    """Forward step for ``megatron.core.pipeline_parallel.get_forward_backward_func()``.

    Each item of ``data_iterator`` is a dict with ``input_ids``, ``position_ids``, ``labels``,
    ``loss_mask`` ([b, s]), ``pixel_values`` ([tiles, 3, H, W] or None) and ``attention_mask``
    (None for causal, or bool [b, 1, s, s] with True = masked, for packed samples).
    """
    batch = next(data_iterator)
    losses_bs = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        pixel_values=batch.get("pixel_values"),
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
    )
    return losses_bs, partial(masked_mean_loss, batch["loss_mask"])
