"""The training step's loss semantics, THD flattening for Transformer Engine, and mask refusal."""

from __future__ import annotations

import torch

from megasail.training.step import masked_loss_sum, reported_loss, thd_inputs


def test_loss_is_a_sum_over_loss_tokens_with_its_count():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    loss, n_tokens, logs = masked_loss_sum(mask, losses)
    assert float(loss) == 1.0 + 3.0 + 6.0 and int(n_tokens) == 3
    # token-weighted across micro-batches: (10 + 2) / (3 + 1), not the mean of per-batch means
    _, _, logs2 = masked_loss_sum(torch.tensor([[1.0]]), torch.tensor([[2.0]]))
    assert reported_loss([logs, logs2]) == 12.0 / 4


def test_thd_inputs_flatten_rows_and_keep_segment_bounds():
    b, s = 2, 6
    batch = {
        "input_ids": torch.arange(b * s).view(b, s), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]] * 2),
        "labels": torch.arange(b * s).view(b, s) + 1, "loss_mask": torch.ones(b, s),
        "attention_mask": torch.zeros(b, 1, s, s, dtype=torch.bool),
        "cu_seqlens": torch.tensor([0, 3, 5, 6, 10, 12], dtype=torch.int32), "pixel_values": None,
    }
    flat, params = thd_inputs(batch)
    assert flat["input_ids"].shape == (1, b * s) and torch.equal(flat["input_ids"][0], torch.arange(12))
    assert flat["attention_mask"] is None  # THD attention takes its bounds from cu_seqlens only
    assert params.qkv_format == "thd" and params.max_seqlen_q == params.max_seqlen_kv == 4
    assert torch.equal(params.cu_seqlens_q, batch["cu_seqlens"])
