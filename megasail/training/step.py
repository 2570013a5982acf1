"""One training step's pieces on megatron's pipeline schedules: the per-token loss and the forward step.

The loss is a sum over loss tokens; megatron normalises gradients by the step's total loss tokens
over all micro-batches and data-parallel ranks (``calculate_per_token_loss``), so every supervised
token weighs the same whatever packing, DP balancing or the DP size put it next to.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megasail.models.packed_attention import block_causal_mask


def masked_loss_sum(loss_mask_bs: torch.Tensor, losses_bs: torch.Tensor):
    """(sum of per-token losses over loss tokens, number of loss tokens, logs), as megatron's
    schedules take from a loss function when ``config.calculate_per_token_loss`` is set.

    logs["lm loss"] is [loss_sum, n_tokens]: sum both over micro-batches (and DP ranks), then divide.
    """
    mask = loss_mask_bs.to(torch.float32).reshape(-1)
    losses = losses_bs.to(torch.float32).reshape(-1)
    loss_sum = (losses * mask).sum()
    n_tokens = mask.sum()
    report = torch.stack([loss_sum.detach(), n_tokens.detach()])
    return loss_sum, n_tokens.to(torch.int), {"lm loss": report}


def reported_loss(logs: list[dict]) -> float:
    """Token-weighted mean loss of a step from the per-micro-batch logs of ``masked_loss_sum``."""
    total = torch.stack([x["lm loss"].float().cpu() for x in logs]).sum(0)
    return float(total[0] / total[1].clamp(min=1))


def batch_to_device(batch: dict, device: torch.device | None = None) -> dict:
    """Move a batch's tensors to the current GPU (a no-op on CPU), without blocking the host."""
    if device is None:
        if not torch.cuda.is_available():
            return batch
        device = torch.device("cuda", torch.cuda.current_device())
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def thd_inputs(batch: dict) -> tuple[dict, PackedSeqParams]:
    """Flatten a packed [b, s] batch into one [1, b*s] row for Transformer Engine's THD attention.

    ``batch["cu_seqlens"]`` (int32, offsets of every sample and padding run over the flattened
    b*s stream) confines attention to each sample; RoPE positions restart per segment in THD.
    Later pipeline stages hold None for the fields they do not use (input_ids off the first stage,
    labels and loss_mask off the last): those stay None.
    """
    cu_seqlens = batch["cu_seqlens"].to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # one host sync, before the device copy
    flat = dict(batch)
    for key in ("input_ids", "position_ids", "labels", "loss_mask"):
        if batch.get(key) is not None:
            flat[key] = batch[key].reshape(1, -1)
    flat["attention_mask"] = None
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    return flat, params


def _unwrap(model):
    while hasattr(model, "module"):  # megatron DDP / Float16Module wrappers
        model = model.module
    return model


def packed_attention(batch: dict, model) -> tuple[dict, PackedSeqParams | None]:
    """A packed batch's attention in the form the model's layers take, from ``batch["cu_seqlens"]``.

    Transformer Engine layers: the batch flattened to THD with ``PackedSeqParams`` (no mask).
    Local layers with ``packed_sequences``: ``attention_mask`` bool [b, 1, s, s] (True = masked
    out), made on the batch's device (call after ``batch_to_device``). Anything else, or a batch
    without ``cu_seqlens`` (one sample per row) or that brings its own mask: unchanged, no params.
    """
    net = _unwrap(model)
    if batch.get("cu_seqlens") is None:
        return batch, None
    if getattr(net, "use_te", False):
        return thd_inputs(batch)
    if getattr(net, "packed_sequences", False) and batch.get("attention_mask") is None:
        b, s = batch["position_ids"].shape  # every pipeline stage holds position_ids
        batch = {**batch, "attention_mask": block_causal_mask(batch["cu_seqlens"], b, s)}
    return batch, None


def forward_step(data_iterator, model):
    """Forward step for ``megatron.core.pipeline_parallel.get_forward_backward_func()``.

    Each item of ``data_iterator`` is a dict with ``input_ids``, ``position_ids``, ``labels``,
    ``loss_mask`` ([b, s]), ``pixel_values`` ([tiles, 3, H, W] or None), and for packed samples
    ``cu_seqlens`` (int32 segment offsets over the flattened [b * s] stream): Transformer Engine
    layers take THD packed-sequence params from it, local layers the block-causal mask built from
    it on the training device (``packed_attention``).
    """
    batch = next(data_iterator)
    packed_seq_params = None
    if getattr(_unwrap(model), "use_te", False):
        batch, packed_seq_params = packed_attention(batch, model)  # THD needs one host sync: before the copy
    batch = batch_to_device(batch)
    if packed_seq_params is not None:
        packed_seq_params = batch_to_device(vars(packed_seq_params))
        packed_seq_params = PackedSeqParams(**packed_seq_params)
    else:
        batch, _ = packed_attention(batch, model)  # local layers: the mask is made on the device
    losses_bs = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        pixel_values=batch.get("pixel_values"),
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
        packed_seq_params=packed_seq_params,
    )
    return losses_bs, partial(masked_loss_sum, batch["loss_mask"])
