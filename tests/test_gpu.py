"""The CUDA production path: Transformer Engine layers equal the local layers, and a training step
runs on the GPU. Marked `gpu`: skipped on machines without CUDA (CI's CPU machines)."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed_test
from model_utils import multimodal_batch, tiny_hf_model, tiny_model_config

pytestmark = [pytest.mark.gpu, pytest.mark.distributed]


def _te_matches_local(rank, world_size):
    from megasail.convert.hf_internvl import hf_to_megasail, to_te_layout
    from megasail.models.sail_vl import SailVLModel
    from megasail.runtime import initialize

    initialize(1, 1, seed=0)
    local_cfg = tiny_model_config(-1, transformer_impl="local")
    te_cfg = tiny_model_config(-1, transformer_impl="te")
    weights = hf_to_megasail(tiny_hf_model(-1).state_dict(), local_cfg)
    local = SailVLModel(local_cfg).cuda().eval()
    local.load_state_dict(weights)
    te = SailVLModel(te_cfg).cuda().eval()
    missing, unexpected = te.load_state_dict(to_te_layout(weights), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    ids, positions, pixels = (t.cuda() for t in multimodal_batch(local_cfg, tiles_per_image=(1, 3)))
    with torch.no_grad():
        out_local = local(ids, positions, pixels)
        out_te = te(ids, positions, pixels)
    torch.testing.assert_close(out_te.float(), out_local.float(), rtol=1e-3, atol=1e-3)


def _have_te() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


@pytest.mark.skipif(not _have_te(), reason="needs Transformer Engine")
def test_transformer_engine_layers_match_local_layers():
    run_distributed_test(_te_matches_local, 1)


def _step_on_gpu(rank, world_size):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megasail.config import ParallelConfig
    from megasail.runtime import initialize
    from megasail.training import build_model_chunks, forward_step, reported_loss, wrap_ddp

    initialize(1, 1, seed=0)
    cfg = tiny_model_config(-1, precision="bf16")
    chunks = build_model_chunks(cfg, ParallelConfig())
    assert all(p.is_cuda for p in chunks[0].parameters())  # plain-torch params moved too
    wrapped = wrap_ddp(chunks, ParallelConfig())
    ids, positions, pixels = multimodal_batch(cfg, tiles_per_image=(1, 2), seq_length=64)
    batch = {"input_ids": ids, "position_ids": positions, "labels": ids.roll(-1, 1),
             "loss_mask": torch.ones(ids.shape), "pixel_values": pixels.bfloat16(), "attention_mask": None}
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]),  # CPU batch
                                         model=wrapped[0], num_microbatches=1, seq_length=64, micro_batch_size=2,
                                         forward_only=False)
    assert torch.isfinite(torch.tensor(reported_loss(losses)))


def test_training_step_runs_on_gpu():
    run_distributed_test(_step_on_gpu, 1)


def _thd_matches_mask(rank, world_size):
    """A packed batch (two samples per row, padding at the end) through TE's THD attention equals the local
    layers with the block-causal mask (the CPU path), per token of every real sample."""
    from megasail.convert.hf_internvl import hf_to_megasail, to_te_layout
    from megasail.models.packed_attention import block_causal_mask
    from megasail.models.sail_vl import SailVLModel
    from megasail.runtime import initialize
    from megasail.training.step import thd_inputs

    initialize(1, 1, seed=0)
    local_cfg = tiny_model_config(-1, transformer_impl="local", packed_sequences=True)
    te_cfg = tiny_model_config(-1, transformer_impl="te", packed_sequences=True)
    weights = hf_to_megasail(tiny_hf_model(-1).state_dict(), local_cfg)
    local = SailVLModel(local_cfg).cuda().eval()
    local.load_state_dict(weights)
    te = SailVLModel(te_cfg).cuda().eval()
    te.load_state_dict(to_te_layout(weights), strict=False)
    seq = 128
    ids, _, pixels = multimodal_batch(local_cfg, tiles_per_image=(1, 0), seq_length=seq, batch=2)
    lengths = [[60, 50, 18], [70, 40, 18]]  # two samples and a padding run per row
    positions = torch.cat([torch.cat([torch.arange(n) for n in row]).unsqueeze(0) for row in lengths])
    cu = torch.tensor([0] + list(torch.tensor([n for row in lengths for n in row]).cumsum(0)), dtype=torch.int32)
    mask = block_causal_mask(cu, 2, seq)
    batch = {"input_ids": ids, "position_ids": positions, "labels": ids.roll(-1, 1), "loss_mask": torch.ones(ids.shape),
             "pixel_values": pixels, "attention_mask": mask, "cu_seqlens": cu, "num_samples": torch.tensor([2, 2])}
    with torch.no_grad():
        out_local = local(input_ids=ids.cuda(), position_ids=positions.cuda(), pixel_values=pixels.cuda(),
                          attention_mask=mask.cuda(), labels=batch["labels"].cuda())
        flat, params = thd_inputs(batch)
        params = type(params)(**{k: (v.cuda() if torch.is_tensor(v) else v) for k, v in vars(params).items()})
        out_te = te(input_ids=flat["input_ids"].cuda(), position_ids=flat["position_ids"].cuda(),
                    pixel_values=pixels.cuda(), attention_mask=None, labels=flat["labels"].cuda(),
                    packed_seq_params=params)
    real = torch.zeros(2, seq, dtype=torch.bool)
    real[0, :110], real[1, :110] = True, True
    torch.testing.assert_close(out_te.reshape(2, seq)[real].float(), out_local[real].float(), rtol=2e-3, atol=2e-3)


@pytest.mark.skipif(not _have_te(), reason="needs Transformer Engine")
def test_thd_packing_matches_the_block_causal_mask():
    run_distributed_test(_thd_matches_mask, 1)


def _fp8_step(rank, world_size):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megasail.config import ParallelConfig
    from megasail.runtime import initialize
    from megasail.training import build_model_chunks, forward_step, reported_loss, wrap_ddp

    initialize(1, 1, seed=0)
    cfg = tiny_model_config(-1, precision="bf16", transformer_impl="te", fp8="hybrid")
    chunks = build_model_chunks(cfg, ParallelConfig())
    wrapped = wrap_ddp(chunks, ParallelConfig())
    ids, positions, pixels = multimodal_batch(cfg, tiles_per_image=(1, 2), seq_length=64)
    batch = {"input_ids": ids, "position_ids": positions, "labels": ids.roll(-1, 1),
             "loss_mask": torch.ones(ids.shape), "pixel_values": pixels.bfloat16(), "attention_mask": None}
    losses = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]),
                                         model=wrapped[0], num_microbatches=1, seq_length=64, micro_batch_size=2,
                                         forward_only=False)
    assert torch.isfinite(torch.tensor(reported_loss(losses)))


@pytest.mark.skipif(not _have_te(), reason="needs Transformer Engine")
def test_an_fp8_training_step_runs():
    run_distributed_test(_fp8_step, 1)


def test_stage_switches_with_overlapped_reduce_and_param_gather_on_gpu(tmp_path):
    """The CPU test of three stages with overlapped grad reduce, on the GPU where the distributed optimizer's
    param all-gather overlaps too (param_sync_func, forward pre-hooks): same losses as without the overlap
    (bf16 tolerance), and each stage's DDP and optimizer collected at the switch."""
    from test_train_stages import _three_stages
    from train_utils import make_datasets

    datasets = make_datasets(str(tmp_path / "data"))
    runs = {}
    for overlap in (False, True):
        out = tmp_path / f"overlap_{overlap}.pt"
        run_distributed_test(_three_stages, 1, datasets, overlap, str(out))
        runs[overlap] = torch.load(out, weights_only=False)
    assert runs[True]["stages"] == runs[False]["stages"]
    torch.testing.assert_close(torch.tensor(runs[True]["losses"]), torch.tensor(runs[False]["losses"]),
                               rtol=2e-2, atol=0)
    for run in runs.values():
        assert all(not any(alive) for _, alive in run["survivors"]), run["survivors"]


def _async_runs(rank, world_size, prefix, root):
    from train_utils import tiny_run_config

    from megasail.training import step as step_module
    from megasail.training.loop import TrainingDiverged, pretrain

    common = [f"data.path={prefix}", "seed=7", "model.precision=bf16", "checkpoint.async_save=true"]
    pretrain(tiny_run_config(common + ["train.iters=4", f"logging.dir={root}/whole"]))
    pretrain(tiny_run_config(common + ["train.iters=2", f"checkpoint.save={root}/ckpt", "checkpoint.interval=1"]))
    pretrain(tiny_run_config(common + ["train.iters=4", f"checkpoint.load={root}/ckpt", f"logging.dir={root}/resumed"]))

    calls = {"n": 0}

    def poisoned(data_iterator, model):  # from step 2 on every loss is NaN: the run diverges at step 3
        losses, loss_func = step_module.forward_step(data_iterator, model)
        calls["n"] += 1
        return (losses * float("nan") if calls["n"] > 4 else losses), loss_func

    try:
        pretrain(tiny_run_config(common + ["train.iters=8", "train.max_nan_steps=2", f"checkpoint.save={root}/div",
                                           "checkpoint.interval=1"]), forward_step_func=poisoned)
    except TrainingDiverged:
        pass


def test_async_saves_publish_resume_and_survive_a_divergence(tmp_path):
    """checkpoint.async_save on a GPU: a run saving in the background every step resumes to the uninterrupted
    run's losses; a run that diverges right after an async save still publishes that save (the latest marker
    names step 1, saved before the NaN steps)."""
    import json

    from train_utils import make_datasets

    prefix = make_datasets(str(tmp_path / "data"))["a"]
    run_distributed_test(_async_runs, 1, prefix, str(tmp_path))
    rows = lambda d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    whole, resumed = rows("whole"), rows("resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in resumed]),
                               torch.tensor([r["loss"] for r in whole][2:]), rtol=1e-3, atol=0)
    assert (tmp_path / "div" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (tmp_path / "div" / "iter_0000002" / "megasail.json").is_file()
