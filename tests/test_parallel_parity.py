"""Tensor / pipeline / sequence / data parallel give the loss and gradients of the unsplit model.

A single-process reference (TP=1, PP=1) runs a training step through megatron's schedule and DDP
and saves its weights, loss and gradients. Each parallel layout then loads the same weights
(sliced with tests/model_utils.shard_state_dict), runs the same step, and compares its loss and
every local gradient shard with the matching slice of the reference gradients.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed_test
from model_utils import multimodal_batch, shard_state_dict, tiny_model_config

pytestmark = [pytest.mark.distributed]

SEQ = 96  # divisible by TP=2 for sequence parallel
LM_LAYERS = 4


def _tiny():
    cfg = tiny_model_config(-1)
    cfg.language.num_layers = LM_LAYERS
    return cfg


def _batch(cfg, seed: int, tiles: tuple[int, ...]) -> dict:
    ids, positions, pixels = multimodal_batch(cfg, tiles_per_image=tiles, seq_length=SEQ, batch=len(tiles), seed=seed)
    g = torch.Generator().manual_seed(1000 + seed)
    labels = torch.randint(0, cfg.language.vocab_size, ids.shape, generator=g)
    loss_mask = (torch.rand(ids.shape, generator=g) < 0.7).float()
    return {
        "input_ids": ids, "position_ids": positions, "labels": labels, "loss_mask": loss_mask,
        "pixel_values": pixels if sum(tiles) else None, "attention_mask": None,
    }


def _step(parallel, batches, full_sd=None):
    """Build this rank's chunks, load weights, run one forward/backward over ``batches``.

    Returns (chunks, wrapped, losses) where losses is the schedule's list (empty off the last stage).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megasail.training.model_builder import build_model_chunks, wrap_ddp
    from megasail.training.step import forward_step

    cfg = _tiny()
    chunks = build_model_chunks(cfg, parallel)
    if full_sd is not None:
        tp_rank, pp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
        for vp, chunk in enumerate(chunks):
            local = shard_state_dict(
                full_sd, cfg, tp_rank, parallel.tensor, pp_rank, parallel.pipeline,
                vp_stage=vp if parallel.virtual_pipeline else None, vp_size=parallel.virtual_pipeline,
                first_stage_layers=parallel.first_stage_llm_layers,
            )
            missing, unexpected = chunk.load_state_dict(local, strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            assert not missing and not unexpected, (missing, unexpected)
    wrapped = wrap_ddp(chunks, parallel)
    for w in wrapped:
        w.zero_grad_buffer()
    data = iter(batches) if len(wrapped) == 1 else [iter(batches) for _ in wrapped]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=wrapped if len(wrapped) > 1 else wrapped[0],
        num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=batches[0]["input_ids"].shape[0],
        forward_only=False,
    )
    return chunks, wrapped, losses


def _loss_terms(losses) -> torch.Tensor:
    """[micro-batch, (loss sum, loss tokens)] from the schedule's logs."""
    return torch.stack([x["lm loss"].float() for x in losses])


def _grads(chunks) -> list[dict]:
    return [{n: p.main_grad.detach().clone() for n, p in c.named_parameters() if p.requires_grad} for c in chunks]


def _parity_batches(cfg):
    return [_batch(cfg, 1, (1, 3)), _batch(cfg, 2, (2, 0))]


def _reference(rank, world_size, out_path):
    from megasail.config import ParallelConfig
    from megasail.runtime import initialize

    initialize(1, 1, seed=7)
    cfg = _tiny()
    parallel = ParallelConfig(distributed_optimizer=False)
    chunks, wrapped, losses = _step(parallel, _parity_batches(cfg))
    full_sd = {k: v.detach().clone() for k, v in chunks[0].state_dict().items() if isinstance(v, torch.Tensor)
               and not k.endswith("_extra_state")}
    result = {"state_dict": full_sd, "loss": _loss_terms(losses), "grads": _grads(chunks)[0]}
    grad_norm, updated = _clipped_step(chunks, wrapped, distributed=False)
    result.update(step_grad_norm=torch.tensor(grad_norm), step_state_dict=updated)
    # the two micro-batches of the data-parallel test, each alone
    image_batch, text_batch = _batch(cfg, 3, (2, 1)), _batch(cfg, 4, (0, 0))
    for name, batch in (("grads_image", image_batch), ("grads_text", text_batch)):
        for w in wrapped:
            w.zero_grad_buffer()
        chunks2, _, _ = _step(parallel, [batch], full_sd)
        result[name] = _grads(chunks2)[0]
    torch.save(result, out_path)


def _clipped_step(chunks, wrapped, distributed: bool) -> tuple[float, dict]:
    """One clipped Adam step of megatron's optimizer on the accumulated grads: (grad norm, new weights).

    adam_eps (1.0) far above every clipped grad makes Adam's first update nearly -lr x grad (as SGD,
    which the distributed optimizer does not take), not -lr x sign(grad); the clip (far below the
    norm) makes every update depend on the global grad norm over all TP and DP ranks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=1.0, adam_eps=1.0, weight_decay=0.0, clip_grad=1e-3,
                             use_distributed_optimizer=distributed)
    ok, grad_norm, _ = get_megatron_optimizer(config, wrapped).step()
    assert ok and grad_norm > 1e-3
    updated = {k: v.detach().clone() for k, v in chunks[0].state_dict().items()
               if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    return float(grad_norm), updated


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "reference.pt"
    run_distributed_test(_reference, 1, str(path))
    return torch.load(path, weights_only=True)


def _check_parallel(rank, world_size, ref_path, parallel_kwargs):
    from megatron.core import parallel_state

    from megasail.config import ParallelConfig
    from megasail.runtime import initialize

    parallel = ParallelConfig(distributed_optimizer=False, **parallel_kwargs)
    initialize(parallel.tensor, parallel.pipeline, parallel.virtual_pipeline, seed=7)
    ref = torch.load(ref_path, weights_only=True)
    cfg = _tiny()
    chunks, _, losses = _step(parallel, _parity_batches(cfg), ref["state_dict"])

    if parallel_state.is_pipeline_last_stage():
        torch.testing.assert_close(_loss_terms(losses), ref["loss"], rtol=1e-5, atol=0)
    tp_rank, pp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    checked = 0
    for vp, grads in enumerate(_grads(chunks)):
        expected = shard_state_dict(
            ref["grads"], cfg, tp_rank, parallel.tensor, pp_rank, parallel.pipeline,
            vp_stage=vp if parallel.virtual_pipeline else None, vp_size=parallel.virtual_pipeline,
            first_stage_layers=parallel.first_stage_llm_layers,
        )
        assert set(grads) == set(expected), set(grads) ^ set(expected)
        for name, grad in grads.items():
            exp = expected[name]
            scale = float(exp.abs().max()) + 1e-12
            torch.testing.assert_close(grad, exp, rtol=1e-4, atol=2e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
            checked += 1
    assert checked > 0


LAYOUTS = {
    "tp2": (2, dict(tensor=2)),
    "tp2_sp": (2, dict(tensor=2, sequence_parallel=True)),
    "pp2": (2, dict(pipeline=2)),
    "pp2_uneven": (2, dict(pipeline=2, first_stage_llm_layers=1)),
    "pp2_vpp2": (2, dict(pipeline=2, virtual_pipeline=2)),
    "tp2_pp2": (4, dict(tensor=2, pipeline=2)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layout_matches_single_process(reference, tmp_path, layout):
    world, kwargs = LAYOUTS[layout]
    path = tmp_path / "reference.pt"
    torch.save(reference, path)
    run_distributed_test(_check_parallel, world, str(path), kwargs)


def _check_data_parallel(rank, world_size, ref_path):
    from megasail.config import ParallelConfig
    from megasail.runtime import initialize

    initialize(1, 1, seed=7)
    ref = torch.load(ref_path, weights_only=True)
    cfg = _tiny()
    # rank 0 sees images, rank 1 a text-only micro-batch: DDP must not wait on vision grads
    batch = _batch(cfg, 3, (2, 1)) if rank == 0 else _batch(cfg, 4, (0, 0))
    chunks, _, _ = _step(ParallelConfig(distributed_optimizer=False), [batch], ref["state_dict"])
    grads = _grads(chunks)[0]
    # the loss is per token over the whole step: each rank's grads weigh by its loss tokens
    n_image, n_text = _batch(cfg, 3, (2, 1))["loss_mask"].sum(), _batch(cfg, 4, (0, 0))["loss_mask"].sum()
    n_vision = 0
    for name, grad in grads.items():
        expected = (n_image * ref["grads_image"][name] + n_text * ref["grads_text"][name]) / (n_image + n_text)
        scale = float(expected.abs().max()) + 1e-12
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=2e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
        if name.startswith(("vision_model.", "projector.")):
            n_vision += 1
            # the text-only rank contributes exact zeros to the vision grads
            torch.testing.assert_close(ref["grads_text"][name], torch.zeros_like(grad), rtol=0, atol=0)
    assert n_vision > 0


def test_data_parallel_text_only_rank(reference, tmp_path):
    path = tmp_path / "reference.pt"
    torch.save(reference, path)
    run_distributed_test(_check_data_parallel, 2, str(path))


def test_distributed_optimizer_step_matches_plain(reference, tmp_path):
    """DP=2 with the distributed optimizer updates weights exactly like DP=2 without it."""
    path = tmp_path / "reference.pt"
    torch.save(reference, path)
    out = tmp_path / "updated"
    out.mkdir()
    run_distributed_test(_optimizer_step, 2, str(path), str(out), True)
    run_distributed_test(_optimizer_step, 2, str(path), str(out), False)
    dist_w = torch.load(out / "True.pt", weights_only=True)
    plain_w = torch.load(out / "False.pt", weights_only=True)
    assert set(dist_w) == set(plain_w)
    changed = 0
    for name in plain_w:
        torch.testing.assert_close(dist_w[name], plain_w[name], rtol=1e-6, atol=1e-7)
        changed += int(not torch.equal(plain_w[name], reference["state_dict"][name]))
    assert changed > 0  # the step really moved the weights


def _optimizer_step(rank, world_size, ref_path, out_dir, distributed):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megasail.config import ParallelConfig
    from megasail.runtime import initialize

    initialize(1, 1, seed=7)
    ref = torch.load(ref_path, weights_only=True)
    cfg = _tiny()
    parallel = ParallelConfig(distributed_optimizer=distributed)
    batch = _batch(cfg, 3, (2, 1)) if rank == 0 else _batch(cfg, 4, (0, 0))
    chunks, wrapped, _ = _step(parallel, [batch], ref["state_dict"])
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, use_distributed_optimizer=distributed), wrapped
    )
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm > 0
    if rank == 0:
        sd = {k: v.detach().clone() for k, v in chunks[0].state_dict().items()
              if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
        torch.save(sd, f"{out_dir}/{distributed}.pt")


def _check_dp2_tp2_distributed_optimizer(rank, world_size, ref_path):
    from megatron.core import parallel_state

    from megasail.config import ParallelConfig
    from megasail.runtime import initialize

    parallel = ParallelConfig(tensor=2)  # distributed_optimizer on: the default
    assert parallel.distributed_optimizer
    initialize(parallel.tensor, parallel.pipeline, seed=7)
    assert parallel_state.get_data_parallel_world_size() == 2
    ref = torch.load(ref_path, weights_only=True)
    cfg = _tiny()
    dp_rank, tp_rank = parallel_state.get_data_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    # the reference's two micro-batches of one step, one per data-parallel rank
    chunks, wrapped, losses = _step(parallel, [_parity_batches(cfg)[dp_rank]], ref["state_dict"])
    torch.testing.assert_close(_loss_terms(losses)[0], ref["loss"][dp_rank], rtol=1e-5, atol=0)
    grad_norm, updated = _clipped_step(chunks, wrapped, distributed=True)
    torch.testing.assert_close(torch.tensor(grad_norm), ref["step_grad_norm"], rtol=1e-5, atol=0)
    expected = shard_state_dict(ref["step_state_dict"], cfg, tp_rank, 2, 0, 1)
    before = shard_state_dict(ref["state_dict"], cfg, tp_rank, 2, 0, 1)
    assert set(updated) == set(expected), set(updated) ^ set(expected)
    moved = 0
    for name, value in updated.items():
        step = (expected[name] - before[name]).abs().max()
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-3 * float(step) + 1e-9,
                                   msg=lambda m, n=name: f"{n}: {m}")
        moved += int(float(step) > 0)
    assert moved > len(updated) // 2  # the step moved most tensors (vision included)


def test_dp2_tp2_distributed_optimizer_matches_single_process(reference, tmp_path):
    """DP=2 x TP=2 with the distributed optimizer (the default): each DP rank runs one of the reference's
    two micro-batches; the loss, the clipped grad norm and every weight after one clipped optimizer step equal the
    single-process step's (its TP slice), each weight within 1e-3 of its own update.

    Fails if both DP ranks read the same micro-batch (planted), if grads are not reduced over DP before
    the optimizer's shard update (planted: finalize_model_grads skipped), or if the grad norm misses a
    TP or DP shard (the clip then scales every update differently)."""
    path = tmp_path / "reference.pt"
    torch.save(reference, path)
    run_distributed_test(_check_dp2_tp2_distributed_optimizer, 4, str(path))
