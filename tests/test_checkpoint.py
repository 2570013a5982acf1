"""Distributed checkpoints: resharding over TP/PP/VPP/DP, exact optimizer resume, atomic publishing
(kill -9 mid-save), keep_last pruning, weights-only loads, key checks, and TE key names on the local spec.

Every parallel test runs megatron-core's real model, DDP, distributed optimizer and scheduler over gloo.
Expected values come from outside the checkpoint code: tests/model_utils.shard_state_dict (the slicing the
parity tests verify against single-process runs), or an uninterrupted run of the same steps.
"""

from __future__ import annotations

import os

import pytest
import torch
from dist_utils import run_distributed_test
from model_utils import multimodal_batch, shard_state_dict, tiny_model_config

SEQ = 48
LM_LAYERS = 4
TESTS = os.path.dirname(os.path.abspath(__file__))


def _tiny():
    cfg = tiny_model_config(-1)
    cfg.language.num_layers = LM_LAYERS
    return cfg


def _batch(cfg, seed: int, tiles: tuple[int, ...] = (1, 0)) -> dict:
    ids, positions, pixels = multimodal_batch(
        cfg, tiles_per_image=tiles, seq_length=SEQ, batch=len(tiles), seed=seed
    )
    g = torch.Generator().manual_seed(1000 + seed)
    return {
        "input_ids": ids,
        "position_ids": positions,
        "labels": torch.randint(0, cfg.language.vocab_size, ids.shape, generator=g),
        "loss_mask": (torch.rand(ids.shape, generator=g) < 0.7).float(),
        "pixel_values": pixels if sum(tiles) else None,
        "attention_mask": None,
    }


def _setup(seed: int, **parallel_kwargs):
    """This rank's (cfg, chunks, wrapped, optimizer, scheduler) for a layout, from megatron-core's builders."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megasail.config import ParallelConfig
    from megasail.runtime import initialize
    from megasail.training import build_model_chunks, wrap_ddp

    parallel = ParallelConfig(**parallel_kwargs)
    initialize(parallel.tensor, parallel.pipeline, parallel.virtual_pipeline, seed=seed)
    cfg = _tiny()
    chunks = build_model_chunks(cfg, parallel)
    wrapped = wrap_ddp(chunks, parallel)
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            clip_grad=1.0,
            weight_decay=0.01,
            use_distributed_optimizer=parallel.distributed_optimizer,
        ),
        wrapped,
    )
    sched = OptimizerParamScheduler(
        opt,
        init_lr=0.0,
        max_lr=1e-2,
        min_lr=1e-3,
        lr_warmup_steps=2,
        lr_decay_steps=20,
        lr_decay_style="cosine",
        start_wd=0.01,
        end_wd=0.01,
        wd_incr_steps=20,
        wd_incr_style="constant",
    )
    return cfg, chunks, wrapped, opt, sched


def _train_step(wrapped, opt, sched, batches) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megasail.training import forward_step

    for w in wrapped:
        w.zero_grad_buffer()
    opt.zero_grad()
    data = iter(batches) if len(wrapped) == 1 else [iter(batches) for _ in wrapped]
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=wrapped if len(wrapped) > 1 else wrapped[0],
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=batches[0]["input_ids"].shape[0],
        forward_only=False,
    )
    ok, _, _ = opt.step()
    assert ok
    sched.step(1)


def _local_weights(chunk) -> dict:
    return {
        k: v.detach().clone()
        for k, v in chunk.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def _dump(out_dir: str, name: str, chunks, **extra) -> None:
    from megatron.core import parallel_state

    torch.save(
        {
            "chunks": [_local_weights(c) for c in chunks],
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            **extra,
        },
        os.path.join(out_dir, f"{name}_rank{torch.distributed.get_rank()}.pt"),
    )


def _load_dumps(out_dir, name: str, world: int) -> list[dict]:
    return [torch.load(os.path.join(out_dir, f"{name}_rank{r}.pt"), weights_only=True) for r in range(world)]


# --- resharding ----------------------------------------------------------------------------------


def _save_tp2_then_load(rank, world_size, root, out_dir):
    """Save at TP=2 after a step, then (same processes, fresh models from another seed) load at
    TP=1 x DP=2 and at PP=2 x VPP=2, dumping every rank's weights after each."""
    from megasail.training.checkpoint import load_checkpoint, save_checkpoint

    cfg, chunks, wrapped, opt, sched = _setup(seed=1, tensor=2)
    _train_step(wrapped, opt, sched, [_batch(cfg, 1), _batch(cfg, 2, (0, 2))])
    save_checkpoint(root, 1, wrapped, opt, sched, meta={"stage": 0, "note": "tp2"})
    _dump(out_dir, "tp2", chunks)
    for name, layout in (("tp1", {}), ("vpp", dict(pipeline=2, virtual_pipeline=2))):
        _, chunks, wrapped, opt, sched = _setup(seed=99, **layout)
        meta = load_checkpoint(root, wrapped, opt, sched)
        _dump(out_dir, name, chunks, note=meta["note"], lr=opt.param_groups[0]["lr"])


@pytest.mark.distributed
def test_tp2_checkpoint_loads_at_tp1_and_pp2_vpp2(tmp_path):
    """Saved at TP=2 after a step; loaded at TP=1 (x DP=2) and at PP=2 x VPP=2 into models from another
    seed: every TP=2 shard equals the matching slice of the TP=1 load, and every PP/VPP chunk holds its
    layers' weights. The optimizer state reshards too (its load raises otherwise) and the LR is restored.

    Fails if: the model is not loaded into the chunks (weights stay the seed-99 init); VPP chunks are
    merged by local names (layer 0 of chunk 1 would overwrite layer 0 of chunk 0); the scheduler is not
    restored (lr differs).
    """
    root, out = str(tmp_path / "ckpt"), str(tmp_path)
    run_distributed_test(_save_tp2_then_load, 2, root, out)
    cfg = _tiny()
    tp1 = _load_dumps(out, "tp1", 2)
    full = tp1[0]["chunks"][0]
    for dump in _load_dumps(out, "tp2", 2):
        expected = shard_state_dict(full, cfg, dump["tp_rank"], 2)
        got = dump["chunks"][0]
        assert set(got) == set(expected), set(got) ^ set(expected)
        for key in got:
            assert torch.equal(got[key], expected[key]), (
                f"{key} (tp rank {dump['tp_rank']}) differs after TP2->TP1"
            )
    checked = 0
    for dump in _load_dumps(out, "vpp", 2):
        for vp, got in enumerate(dump["chunks"]):
            expected = shard_state_dict(full, cfg, 0, 1, dump["pp_rank"], 2, vp_stage=vp, vp_size=2)
            assert set(got) == set(expected), set(got) ^ set(expected)
            for key in got:
                assert torch.equal(got[key], expected[key]), f"{key} (pp {dump['pp_rank']}, vp {vp}) differs"
                checked += 1
        assert dump["note"] == "tp2" and dump["lr"] == tp1[0]["lr"] > 0
    assert checked > 0
