"""Attention over packed rows, built where the layers run: the block-causal mask from ``cu_seqlens``.

The loader ships only ``cu_seqlens`` (int32 offsets of every segment, samples and padding, over the
flattened [b * s] token stream); a [b, 1, s, s] mask is 64 MiB per 8192-token row, so it is made
on the training device and only for layers that take one (the local spec's dense attention with
``AttnMaskType.arbitrary``). Transformer Engine reads ``cu_seqlens`` itself (THD
``PackedSeqParams``, ``megasail.training.step.thd_inputs``).
"""

from __future__ import annotations

import torch


def block_causal_mask(cu_seqlens: torch.Tensor, batch_size: int, seq_length: int) -> torch.Tensor:
    """bool [b, 1, s, s], True = masked out: token t of a row sees the tokens of its own segment up to t.

    cu_seqlens: int [segments + 1] offsets over the flattened [b * s] stream, starting at 0 and
    holding every row end (b * s included), as the loader's batches do. The mask is made on
    cu_seqlens' device, with no host synchronisation.
    """
    bounds = cu_seqlens.to(torch.int64)
    positions = torch.arange(batch_size * seq_length, device=bounds.device)
    # segment of each token: cu[k] <= t < cu[k + 1] gives k + 1 (only equality matters below)
    segment_bs = torch.searchsorted(bounds, positions, right=True).view(batch_size, seq_length)
    future_ss = torch.ones(seq_length, seq_length, dtype=torch.bool, device=bounds.device).triu_(1)
    mask_bss = segment_bs[:, :, None] != segment_bs[:, None, :]
    return mask_bss.logical_or_(future_ss)[:, None]
