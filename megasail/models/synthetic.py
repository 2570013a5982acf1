"""Synthetic VLM micro-batches with the real token layout, for demos, benchmarks and tests.

Each sample is: prompt text, ``<img>`` + tiles*tokens_per_tile ``<IMG_CONTEXT>`` + ``</img>``,
then answer text; the loss counts the answer only.
"""

from __future__ import annotations

import torch

from megasail.models.config import ModelConfig

TEXT_ID_LIMIT = 151643  # ordinary BPE ids lie below <|endoftext|>


def synthetic_batch(
    model_cfg: ModelConfig,
    seq_length: int,
    tiles_per_sample: list[int],
    seed: int = 0,
    prompt_tokens: int = 8,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """A micro-batch of len(tiles_per_sample) samples, each padded to seq_length.

    tiles_per_sample[i] = 0 gives a text-only sample. Returns the dict ``training.step.forward_step``
    reads: input_ids, position_ids, labels, loss_mask [b, s]; pixel_values [tiles, 3, H, W] or None.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = min(model_cfg.language.vocab_size, TEXT_ID_LIMIT, model_cfg.image_token_id - 2)
    tpt = model_cfg.tokens_per_tile
    # SAIL-VL's vocabulary puts <img>, </img>, <IMG_CONTEXT> at 151665-151667: keep that layout
    img_start, img_end = model_cfg.image_token_id - 2, model_cfg.image_token_id - 1
    rows, masks = [], []
    for tiles in tiles_per_sample:
        image = [img_start] + [model_cfg.image_token_id] * (tiles * tpt) + [img_end] if tiles else []
        prompt = torch.randint(0, vocab, (prompt_tokens,), generator=g).tolist()
        n_answer = seq_length - len(prompt) - len(image)
        if n_answer < 2:
            raise ValueError(f"seq_length {seq_length} too short for {tiles} tiles of {tpt} tokens")
        answer = torch.randint(0, vocab, (n_answer,), generator=g).tolist()
        rows.append(prompt + image + answer)
        masks.append([0.0] * (len(prompt) + len(image)) + [1.0] * n_answer)
    tokens = torch.tensor(rows, dtype=torch.long)
    labels = torch.roll(tokens, -1, dims=1)  # labels[t] is the token after t
    loss_mask = torch.tensor(masks)
    loss_mask = torch.roll(loss_mask, -1, dims=1)  # position t learns token t+1: mask follows the label
    loss_mask[:, -1] = 0.0
    n_tiles = sum(tiles_per_sample)
    size = model_cfg.vision.image_size
    pixels = torch.randn(n_tiles, 3, size, size, generator=g, dtype=torch.float32).to(dtype) if n_tiles else None
    b = len(tiles_per_sample)
    return {
        "input_ids": tokens,
        "position_ids": torch.arange(seq_length).unsqueeze(0).expand(b, -1).contiguous(),
        "labels": labels,
        "loss_mask": loss_mask,
        "pixel_values": pixels,
        "attention_mask": None,
    }
