"""The block-causal mask made on the training device from cu_seqlens: the mask the loader used to ship,
the same loss bit for bit, and the retired `data.build_attention_mask` key refused with what to do."""

from __future__ import annotations

import pytest
import torch
from model_utils import tiny_model_config

from megasail.models.packed_attention import block_causal_mask

S = 8
# Two packed rows of 8 tokens, offsets over the flattened [2 * 8] stream:
#   row 0: samples of 3 and 4 tokens, then 1 token of padding
#   row 1: samples of 2, 3 and 2 tokens, then 1 token of padding
CU_SEQLENS = torch.tensor([0, 3, 7, 8, 10, 13, 15, 16], dtype=torch.int32)
# The mask the loader built before (True = masked out), written out by hand: 0 = may attend.
EXPECTED_ROWS = [
    [
        "01111111",
        "00111111",
        "00011111",
        "11101111",
        "11100111",
        "11100011",
        "11100001",
        "11111110",
    ],
    [
        "01111111",
        "00111111",
        "11011111",
        "11001111",
        "11000111",
        "11111011",
        "11111001",
        "11111110",
    ],
]


def expected_mask() -> torch.Tensor:
    return torch.tensor([[[int(c) for c in line] for line in row] for row in EXPECTED_ROWS], dtype=torch.bool)[:, None]


def test_mask_from_cu_seqlens_is_the_hand_written_block_causal_mask():
    """Each token sees its own sample up to itself; padding is its own block; rows never mix.

    Fault caught: a segment boundary one token late (searchsorted right=False puts each sample's first
    token in the sample before it)."""
    mask = block_causal_mask(CU_SEQLENS, 2, S)
    assert mask.shape == (2, 1, S, S) and mask.dtype == torch.bool
    assert torch.equal(mask, expected_mask())


@pytest.fixture(scope="module")
def megatron_tp1():
    from megasail import runtime

    runtime.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=3)
    yield
    runtime.destroy()


def _packed_batch(config) -> dict:
    g = torch.Generator().manual_seed(5)
    vocab = config.language.vocab_size
    ids = torch.randint(0, vocab - 10, (2, S), generator=g)
    lengths = [[3, 4, 1], [2, 3, 2, 1]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    return {
        "input_ids": ids, "position_ids": positions, "labels": torch.randint(0, vocab - 10, (2, S), generator=g),
        "loss_mask": torch.tensor([[1, 1, 0, 1, 1, 1, 0, 0], [1, 0, 1, 1, 0, 1, 0, 0]], dtype=torch.float32),
        "pixel_values": None, "cu_seqlens": CU_SEQLENS, "num_samples": torch.tensor([2, 3]),
    }


def test_loss_with_the_device_mask_equals_the_loader_mask_bit_for_bit(megatron_tp1):
    """forward_step on a loader batch (cu_seqlens, no mask) gives exactly the per-token losses and loss sum
    of the model run with the hand-written mask the loader used to ship; without a block mask they differ.

    Fault caught: a segment boundary one token late in block_causal_mask (searchsorted right=False);
    forward_step not building the mask for local layers (plain causal: samples see each other)."""
    from megasail.models.sail_vl import SailVLModel
    from megasail.training.step import forward_step, masked_loss_sum

    config = tiny_model_config(-1, packed_sequences=True)
    model = SailVLModel(config).eval()
    batch = _packed_batch(config)
    assert "attention_mask" not in batch
    with torch.no_grad():
        device_losses, loss_func = forward_step(iter([batch]), model)
        device_sum, device_tokens, _ = loss_func(device_losses)
        loader_losses = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              attention_mask=expected_mask(), labels=batch["labels"])
        loader_sum, loader_tokens, _ = masked_loss_sum(batch["loss_mask"], loader_losses)
        causal_losses = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              labels=batch["labels"])
    assert torch.equal(device_losses, loader_losses)
    assert torch.equal(device_sum, loader_sum) and int(device_tokens) == int(loader_tokens) == 9
    assert not torch.equal(causal_losses, loader_losses)  # the block mask matters on this batch


def test_forward_step_leaves_batches_without_cu_seqlens_alone(megatron_tp1):
    """A synthetic batch (one sample per row, no cu_seqlens) runs with the model's own causal mask.

    Fault caught: a mask made up for a batch without segment offsets."""
    from megasail.training.step import packed_attention

    model = type("Local", (), {"use_te": False, "packed_sequences": True})()
    batch = {"input_ids": torch.zeros(1, S, dtype=torch.long), "position_ids": torch.arange(S)[None]}
    assert packed_attention(batch, model) == (batch, None)
    with_bounds = {**batch, "cu_seqlens": torch.tensor([0, 5, 8], dtype=torch.int32)}
    out, params = packed_attention(with_bounds, model)
    assert params is None and torch.equal(out["attention_mask"][0, 0, 5:, :5], torch.ones(3, 5, dtype=torch.bool))


@pytest.mark.parametrize("where", ["override", "file"])
def test_build_attention_mask_is_refused_with_what_to_do(tmp_path, where):
    """The key is derived from model.transformer_impl now: a config setting it is refused, naming the key,
    the file and line, and what to do.

    Fault caught: the key silently accepted, or refused as merely 'unknown'."""
    from megasail.config import ConfigError, load_config

    if where == "file":
        path = tmp_path / "run.yaml"
        path.write_text("seed: 3\ndata:\n  seq_length: 64\n  build_attention_mask: false\n")
        args, place = (str(path), []), rf"{path}:4"
    else:
        args, place = (None, ["data.build_attention_mask=true"]), "override 'data.build_attention_mask=true'"
    with pytest.raises(ConfigError) as error:
        load_config(*args)
    message = str(error.value)
    assert message.startswith(place)
    assert "'data.build_attention_mask' is no longer a config key" in message
    assert "derived from model.transformer_impl" in message and "remove the key" in message
