"""The training loop charges a step the FLOPs of what trains: a real pretrain() alignment run (projector
only) at two data-parallel ranks, checked against the formula written out here over the batches the
model actually ran."""

from __future__ import annotations

import json

import pytest
from dist_utils import run_distributed_test
from train_utils import make_dataset, tiny_run_config

pytestmark = [pytest.mark.distributed]


def _align(rank, world_size, prefix, logdir, out):
    """pretrain() one projector-only stage; every micro-batch this rank's model ran goes to ``out``."""
    from megasail.data.loader.config import SourceConfig, StageConfig
    from megasail.training import step as step_module
    from megasail.training.loop import pretrain

    seen = []

    def recording(data_iterator, model):
        batch = next(data_iterator)
        pixels = batch.get("pixel_values")
        seen.append(
            {
                "tiles": int(pixels.shape[0]) if pixels is not None else 0,
                "cu_seqlens": batch["cu_seqlens"].tolist(),
                "num_samples": batch["num_samples"].tolist(),
                "seq_length": int(batch["position_ids"].shape[-1]),
            }
        )
        return step_module.forward_step(iter([batch]), model)

    cfg = tiny_run_config(["train.iters=2", f"logging.dir={logdir}", "seed=4"])
    cfg.data.stages = [
        StageConfig(name="align", sources=[SourceConfig(prefix)], budget_samples=1000, trainable=["projector"])
    ]
    pretrain(cfg, forward_step_func=recording)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(seen, f)


def _sample_lengths(batch: dict) -> list[int]:
    """Real samples of a recorded batch: each row's first num_samples segments (the rest is padding)."""
    s, bounds, lengths = batch["seq_length"], batch["cu_seqlens"], []
    for row, n in enumerate(batch["num_samples"]):
        inner = [b for b in bounds if row * s <= b <= (row + 1) * s]
        lengths += [inner[i + 1] - inner[i] for i in range(n)]
    return lengths


def test_alignment_step_is_charged_the_projector_only_flops(tmp_path):
    """tflops_per_device x step_time x world of each logged step equals, for the micro-batches the
    model ran on both ranks: the frozen ViT 1x (nothing before it trains), the projector 3x, the
    frozen LLM 2x its weight matmuls and logits and 3x its causal attention core, real tokens only.

    Fault caught: the loop charging every part 3x (all three trained during alignment), the padding
    segments counted, or one rank's FLOPs logged for both."""
    root = tmp_path / "data"
    prefix = make_dataset(str(root), "a", 48, 1)
    logdir, out = tmp_path / "logs", tmp_path / "batches.json"
    run_distributed_test(_align, 2, prefix, str(logdir), str(out))
    steps = [json.loads(x) for x in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in steps] == ["align", "align"]
    with open(prefix + ".manifest.json") as f:
        tokenizer_vocab = json.load(f)["tokenizer"]["vocab_size"]
    vocab = -(-tokenizer_vocab // 128) * 128  # the output layer's rows: padded to a multiple of 128 at TP 1

    # tiny.yaml at the test's sizes: ViT 1 layer (hidden 64, ffn 128, 1025 tokens per 448px tile),
    # projector 256 tokens of 256 -> 64 -> 64, LLM 2 layers (hidden 64, 4 heads of 16, 2 KV groups, ffn 128)
    vit_tile = 2 * 1024 * 3 * 14 * 14 * 64 + 2 * 1025 * (4 * 64 * 64 + 2 * 64 * 128) + 4 * 1025 * 1025 * 64
    projector_tile = 2 * 256 * (256 * 64 + 64 * 64)
    llm_token = 2 * (2 * 64 * (4 + 2 * 2) * 16 + 2 * 4 * 16 * 64 + 2 * 3 * 64 * 128) + 2 * 64 * vocab
    llm_pair = 2 * 4 * 4 * 16

    ranks = [json.loads((tmp_path / f"batches.json.{r}").read_text()) for r in range(2)]
    every = [b for r in ranks for b in r]
    assert any(b["tiles"] for b in every)  # images: the ViT and projector terms are exercised
    assert any(sum(_sample_lengths(b)) < b["seq_length"] * len(b["num_samples"]) for b in every)  # padding
    per_step = len(ranks[0]) // len(steps)
    assert per_step * len(steps) == len(ranks[0]) == len(ranks[1]) and per_step >= 1
    for i, m in enumerate(steps):
        expected = 0.0
        for batches in ranks:
            for b in batches[i * per_step : (i + 1) * per_step]:
                lengths = _sample_lengths(b)
                pairs = sum(n * (n + 1) // 2 for n in lengths)
                expected += 1 * b["tiles"] * vit_tile + 3 * b["tiles"] * projector_tile
                expected += 2 * sum(lengths) * llm_token + 3 * pairs * llm_pair
        logged = m["tflops_per_device"] * 1e12 * m["step_time"] * 2  # world 2
        assert logged == pytest.approx(expected, rel=1e-9), (i, logged, expected)
        assert m["mfu"] is None and m["hfu"] is None  # no peak on CPU
        tokens = sum(sum(_sample_lengths(b)) for r in ranks for b in r[i * per_step : (i + 1) * per_step])
        assert tokens == m["tokens"]
