"""Distributed checkpoints: resharding over TP/PP/VPP/DP, exact optimizer resume, atomic publishing
(kill -9 mid-save), keep_last pruning, weights-only loads, key checks, and TE key names on the local spec.

Every parallel test runs megatron-core's real model, DDP, distributed optimizer and scheduler over gloo.
Expected values come from outside the checkpoint code: tests/model_utils.shard_state_dict (the slicing the
parity tests verify against single-process runs), or an uninterrupted run of the same steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from dist_utils import run_distributed_test
from model_utils import multimodal_batch, shard_state_dict, tiny_model_config
from process_utils import assert_all_die, descendants

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


def _setup(seed: int, trainable=None, **parallel_kwargs):
    """This rank's (cfg, chunks, wrapped, optimizer, scheduler) for a layout, from megatron-core's builders;
    ``trainable`` freezes all other parts (as a curriculum stage does)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megasail.config import ParallelConfig
    from megasail.runtime import initialize
    from megasail.training import build_model_chunks, freeze, wrap_ddp

    parallel = ParallelConfig(**parallel_kwargs)
    initialize(parallel.tensor, parallel.pipeline, parallel.virtual_pipeline, seed=seed)
    cfg = _tiny()
    chunks = build_model_chunks(cfg, parallel)
    if trainable is not None:
        freeze(chunks, trainable)
    wrapped = wrap_ddp(chunks, parallel)
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=1e-2,
            min_lr=1e-3,
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
    """Save at TP=2 after a step (the optimizer fully_reshardable), then (same processes, fresh models from
    another seed) load at TP=1 x DP=2 and at PP=2 x VPP=2, dumping every rank's weights after each."""
    from megasail.checkpoint import load_checkpoint, save_checkpoint

    cfg, chunks, wrapped, opt, sched = _setup(seed=1, tensor=2)
    _train_step(wrapped, opt, sched, [_batch(cfg, 1), _batch(cfg, 2, (0, 2))])
    save_checkpoint(
        root, 1, wrapped, opt, sched, meta={"stage": 0, "note": "tp2"}, optimizer_sharding="fully_reshardable"
    )
    _dump(out_dir, "tp2", chunks)
    for name, layout in (("tp1", {}), ("vpp", dict(pipeline=2, virtual_pipeline=2))):
        _, chunks, wrapped, opt, sched = _setup(seed=99, **layout)
        meta = load_checkpoint(root, wrapped, opt, sched)
        _dump(
            out_dir,
            name,
            chunks,
            note=meta["note"],
            lr=opt.param_groups[0]["lr"],
            sched_steps=sched.num_steps,
        )


@pytest.mark.distributed
def test_tp2_checkpoint_loads_at_tp1_and_pp2_vpp2(tmp_path):
    """Saved at TP=2 after a step; loaded at TP=1 (x DP=2) and at PP=2 x VPP=2 into models from another
    seed: every TP=2 shard equals the matching slice of the TP=1 load, and every PP/VPP chunk holds its
    layers' weights. The optimizer state (saved fully_reshardable) reshards too (its load raises
    otherwise) and the LR is restored.

    Fails if: the model weights are not read (they stay the seed-99 init); VPP chunks are
    merged by local names (layer 0 of chunk 1 would overwrite layer 0 of chunk 0); the scheduler is not
    restored (its step count stays 0).
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
        assert dump["sched_steps"] == tp1[0]["sched_steps"] == 1  # the scheduler's own position
    assert checked > 0


# --- optimizer resume ----------------------------------------------------------------------------


def _resume_optimizer(rank, world_size, root, out_dir):
    """DP=2: step 1, save, step 2 (uninterrupted); then fresh models load the checkpoint and run step 2
    at the same layout (DP=2), at TP=2 x DP=1 (both ranks' micro-batches in one step; from a second save
    of step 1, fully_reshardable), and weights only."""
    from megasail.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint

    cfg, chunks, wrapped, opt, sched = _setup(seed=1)
    step1 = [_batch(cfg, 1 + rank, (1, 2))]
    step2 = [_batch(cfg, 3, (2, 0)), _batch(cfg, 4, (0, 1))]  # rank r takes step2[r] at DP=2
    _train_step(wrapped, opt, sched, step1)
    save_checkpoint(root, 1, wrapped, opt, sched, meta={"stage": 0}, optimizer_sharding="dp_reshardable")
    full_root = os.path.join(root, "fully_reshardable")
    save_checkpoint(
        full_root, 1, wrapped, opt, sched, meta={"stage": 0}, optimizer_sharding="fully_reshardable"
    )
    _train_step(wrapped, opt, sched, [step2[rank]])
    _dump(out_dir, "straight", chunks)

    _, chunks, wrapped, opt, sched = _setup(seed=99)
    load_checkpoint(root, wrapped, opt, sched)
    _train_step(wrapped, opt, sched, [step2[rank]])
    _dump(out_dir, "same_layout", chunks)

    _, chunks, wrapped, opt, sched = _setup(seed=99, tensor=2)
    try:  # the dp_reshardable state holds the TP=1 buffers: refused at TP=2, naming the ways on
        load_checkpoint(root, wrapped, opt, sched)
        refused = None
    except CheckpointMismatchError as e:
        refused = str(e)
    load_checkpoint(full_root, wrapped, opt, sched)
    _train_step(wrapped, opt, sched, step2)
    _dump(out_dir, "tp2_dp1", chunks, refused=refused)

    _, chunks, wrapped, opt, sched = _setup(seed=99)
    load_checkpoint(root, wrapped, opt, sched, weights_only=True)
    adam_state = sum(len(sub.optimizer.state) for sub in opt.chained_optimizers)
    _dump(out_dir, "weights_only", chunks, lr=opt.param_groups[0]["lr"], adam_state=adam_state)
    _dump(out_dir, "after_step1", _setup(seed=1)[1])  # what the step-1 checkpoint holds, re-derived

    # an alignment stage at PP=2: only the projector trains, the last stage has no optimizer state
    frozen_root = os.path.join(root, "frozen")
    cfg, chunks, wrapped, opt, sched = _setup(seed=1, trainable=["projector"], pipeline=2)
    _train_step(wrapped, opt, sched, step2)
    save_checkpoint(frozen_root, 1, wrapped, opt, sched, meta={"stage": 0})
    _train_step(wrapped, opt, sched, step2[::-1])
    _dump(out_dir, "frozen_straight", chunks)
    _, chunks, wrapped, opt, sched = _setup(seed=99, trainable=["projector"], pipeline=2)
    load_checkpoint(frozen_root, wrapped, opt, sched)
    _train_step(wrapped, opt, sched, step2[::-1])
    _dump(out_dir, "frozen_resumed", chunks)


@pytest.mark.distributed
def test_optimizer_state_resumes_exactly_and_across_dp(tmp_path):
    """A checkpoint after step 1 at DP=2 (distributed optimizer) continues to step 2:
    at DP=2 bit-identically to the uninterrupted run; at TP=2 x DP=1 (the optimizer saved
    fully_reshardable, the default, resharded over TP and DP) to rounding (Adam divides near-zero gradients
    by their own size: 1e-4, a hundredth of the lr); the dp_reshardable save is refused at TP=2 with a
    message naming its TP and the ways on; a weights-only load leaves the optimizer and schedule fresh.
    In the dp_reshardable save the distributed optimizer's buffers are keys whose chunks come from both
    ranks' files (each DP rank wrote its own half, nothing gathered); the fully_reshardable one stores
    per-parameter keys instead.

    Fails if: the optimizer state is not saved or not loaded (Adam's first step from zero moments moves
    every weight by ~lr); the Adam step count is lost (bias correction differs); the scheduler is not
    restored (step 2 runs at another lr); weights_only still loads the optimizer or the schedule; a
    pipeline stage whose layers are all frozen (alignment stage, PP=2) tries to save optimizer state it
    does not have (megatron-core asserts) or the frozen-stage resume is not exact; a dp_reshardable state
    loads at another TP (planted: the layout check skipped -> megatron's load fails on missing keys with a
    message about frozen parameters); the dp_reshardable save gathers (planted: its layout
    not passed on to megatron -> no buffer key spans two ranks' files); a dp_reshardable load restores Adam's
    step (planted: the torch Adam fix handing the pre-load step 0 over -> same layout not bit-identical).
    """
    root, out = str(tmp_path / "ckpt"), str(tmp_path)
    run_distributed_test(_resume_optimizer, 2, root, out)
    default = _optimizer_chunks_by_file(os.path.join(root, "iter_0000001"))
    buffers = {k: ranks for k, ranks in default.items() if ".gbuf_idx_" in k}
    assert buffers and all(ranks == {"0", "1"} for ranks in buffers.values()), default
    full = _optimizer_chunks_by_file(os.path.join(root, "fully_reshardable", "iter_0000001"))
    assert full and not any(".gbuf_idx_" in k for k in full), full
    cfg = _tiny()
    straight = _load_dumps(out, "straight", 2)
    for same in _load_dumps(out, "same_layout", 2):
        for key, value in straight[0]["chunks"][0].items():
            assert torch.equal(same["chunks"][0][key], value), f"{key}: resumed step 2 is not bit-identical"
    full = straight[0]["chunks"][0]
    moved = 0
    for dump in _load_dumps(out, "tp2_dp1", 2):
        refused = dump["refused"] or ""
        assert "dp_reshardable, saved at TP=1 PP=1" in refused and "this run is TP=2" in refused, refused
        assert "checkpoint.optimizer_sharding=fully_reshardable" in refused, refused
        expected = shard_state_dict(full, cfg, dump["tp_rank"], 2)
        for key, value in expected.items():
            torch.testing.assert_close(
                dump["chunks"][0][key], value, rtol=0, atol=1e-4, msg=lambda m, k=key: f"{k}: {m}"
            )
    before = _load_dumps(out, "after_step1", 2)[0]["chunks"][0]
    for key in full:
        moved += int(not torch.equal(full[key], before[key]))
    assert moved > 0  # step 2 really changed the weights
    weights_only = _load_dumps(out, "weights_only", 2)[0]
    assert weights_only["adam_state"] == 0 and weights_only["lr"] == 0.0  # fresh: init_lr=0 before warmup
    for key, value in before.items():
        assert torch.equal(weights_only["chunks"][0][key], value), f"{key}: weights-only load differs"
    for straight, resumed in zip(
        _load_dumps(out, "frozen_straight", 2), _load_dumps(out, "frozen_resumed", 2), strict=True
    ):
        for key, value in straight["chunks"][0].items():
            assert torch.equal(resumed["chunks"][0][key], value), f"{key}: frozen-stage resume differs"


def _optimizer_chunks_by_file(step: str) -> dict[str, set[str]]:
    """{optimizer key: the .distcp files holding its chunks}, read from torch DCP's .metadata."""
    import torch.distributed.checkpoint as dcp

    files: dict[str, set[str]] = {}
    for index, info in dcp.FileSystemReader(step).read_metadata().storage_data.items():
        if index.fqn.startswith("optimizer."):
            files.setdefault(index.fqn, set()).add(info.relative_path.split("_")[2])
    return files


# --- kill -9 during a save, keep_last --------------------------------------------------------------


def _run_role(role: str, root: str, out_dir: str) -> None:
    """One process (world size 1), started by the kill -9 test as ``python tests/test_checkpoint.py``.

    save: step, save iteration 1, then step and save iteration 2 pausing before it is published (the
    test kills it there). resume: load the latest, dump its weights, save iterations 3 and 4 (keep_last=2).
    """
    from megasail.checkpoint import PAUSE_ENV, load_checkpoint, save_checkpoint
    from megasail.runtime import destroy

    cfg, chunks, wrapped, opt, sched = _setup(seed=1 if role == "save" else 99)
    if role == "save":
        _train_step(wrapped, opt, sched, [_batch(cfg, 1)])
        save_checkpoint(root, 1, wrapped, opt, sched, meta={"stage": 0})
        _dump(out_dir, "iter1", chunks)
        _train_step(wrapped, opt, sched, [_batch(cfg, 2)])
        os.environ[PAUSE_ENV] = "600"
        print("saving iteration 2", flush=True)
        save_checkpoint(root, 2, wrapped, opt, sched, meta={"stage": 0})
        raise AssertionError("the save of iteration 2 should have been killed")
    meta = load_checkpoint(root, wrapped, opt, sched)
    _dump(out_dir, "resumed", chunks, iteration=meta["iteration"])
    for iteration in (3, 4):
        _train_step(wrapped, opt, sched, [_batch(cfg, iteration)])
        save_checkpoint(root, iteration, wrapped, opt, sched, meta={"stage": 0}, keep_last=2)
    destroy()


def _role_command(role: str, root, out) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), role, str(root), str(out)]


def _role_env() -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")
    }
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(TESTS)}


@pytest.mark.distributed
def test_kill9_during_save_leaves_previous_checkpoint_latest(tmp_path):
    """kill -9 while iteration 2 is being saved (shards written, not yet published): the marker still
    names iteration 1, which loads with the weights it was saved with; the next save removes the stale
    .tmp dir and keep_last=2 prunes iteration 1.

    Fails if: shards are written straight into the step dir instead of under .tmp + rename; stale .tmp
    dirs are kept; keep_last does not prune; megatron's write-results Manager (a process dist_checkpointing's
    writer spawns, which does not watch its parent) outlives the killed trainer (planted: the queue not
    seeded with a Manager that dies with the trainer), or its resource tracker does not exit by itself.
    """
    from megasail.checkpoint import MARKER, META, latest_checkpoint, step_dir

    root = tmp_path / "ckpt"
    proc = subprocess.Popen(
        _role_command("save", root, tmp_path),
        env=_role_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: nothing it started outlives a failing test
    )
    tmp2 = step_dir(str(root), 2) + ".tmp"
    deadline = time.monotonic() + 240
    try:
        # dist_checkpointing writes metadata.json last: from then on the save sleeps before publishing
        while not os.path.exists(os.path.join(tmp2, "metadata.json")):
            assert proc.poll() is None, f"save process exited early:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "iteration 2 was never written"
            time.sleep(0.2)
        left = descendants(proc.pid)
        assert left, "the saving process started no writer process"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert_all_die(left, 10.0, "processes the killed trainer started")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(str(root)) == step_dir(str(root), 1)
    assert (root / MARKER).read_text().strip() == "1"
    assert os.path.isdir(tmp2) and not os.path.exists(os.path.join(tmp2, META))

    done = subprocess.run(
        _role_command("resume", root, tmp_path), env=_role_env(), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed, saved = _load_dumps(tmp_path, "resumed", 1)[0], _load_dumps(tmp_path, "iter1", 1)[0]
    assert resumed["iteration"] == 1
    for key, value in saved["chunks"][0].items():
        assert torch.equal(resumed["chunks"][0][key], value), f"{key} differs from the iteration-1 save"
    assert sorted(os.listdir(root)) == sorted([MARKER, "iter_0000003", "iter_0000004"])
    assert (root / MARKER).read_text().strip() == "4"


def test_prune_keeps_the_newest_and_the_marked_step(tmp_path):
    """keep_last counts published step dirs only (a .tmp or a dir without megasail.json is not one) and
    never deletes the one the marker names. Fails if: prune sorts by name length or mtime instead of
    iteration; it deletes the marked step; it counts unpublished dirs."""
    from megasail.checkpoint import MARKER, META, prune

    for it in (5, 40, 9_999_999, 10_000_000):  # 8 digits: name order is no longer iteration order
        (tmp_path / f"iter_{it:07d}").mkdir()
        (tmp_path / f"iter_{it:07d}" / META).write_text("{}")
    (tmp_path / "iter_0002000.tmp").mkdir()
    (tmp_path / "iter_0003000").mkdir()  # no megasail.json: not published
    (tmp_path / MARKER).write_text("40\n")
    removed = prune(str(tmp_path), keep_last=1)
    assert sorted(os.path.basename(p) for p in removed) == ["iter_0000005", "iter_9999999"]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [MARKER, "iter_0000040", "iter_10000000", "iter_0002000.tmp", "iter_0003000"]
    )
    assert prune(str(tmp_path), keep_last=0) == []


# --- TE key names on the local spec, and load errors ------------------------------------------------


def _single_process(rank, world_size, root, out_path):
    """World size 1: the local model's state-dict and checkpoint keys; the errors of bad loads; a
    weights-only load into a bf16 model whose optimizer already exists."""
    from megasail.checkpoint import load_checkpoint, model_sharded_state_dict, save_checkpoint
    from megasail.models.sail_vl import SailVLModel

    cfg, chunks, wrapped, opt, _ = _setup(seed=1)
    merged, _ = model_sharded_state_dict(chunks)
    result = {"state_dict": sorted(_local_weights(chunks[0])), "sharded": sorted(merged)}
    save_checkpoint(root, 0, chunks, meta={"stage": 0})  # weights only (no optimizer)
    errors = {}

    def error_of(name, fn):
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - the message is what is checked (DCP raises BaseExceptions)
            errors[name] = f"{type(e).__name__}: {e}"

    error_of("optimizer_from_weights_only", lambda: load_checkpoint(root, wrapped, opt))
    for name, change in (
        ("fewer_layers", {"num_layers": LM_LAYERS - 1}),
        ("bigger_vocab", {"vocab_size": 320}),
    ):
        other = _tiny()
        for field, value in change.items():
            setattr(other.language, field, value)
        error_of(name, lambda other=other: load_checkpoint(root, [SailVLModel(other)], weights_only=True))
    error_of("empty_root", lambda: load_checkpoint(os.path.join(root, "nothing"), chunks, weights_only=True))
    result["errors"] = errors
    result["damaged"] = _damaged_shard(os.path.join(root, "damaged"), chunks, error_of, errors)
    result["publish"] = _rename_fails_in_publishing(os.path.join(root, "publish"), chunks)
    result["bf16"] = _bf16_weights_only(os.path.join(root, "bf16"))
    torch.save(result, out_path)


def _damaged_shard(root, chunks, error_of, errors) -> dict:
    """Steps 1 and 2 saved, one .distcp file of step 2 cut to half its length, step 2 loaded."""
    from megasail.checkpoint import load_checkpoint, save_checkpoint

    for step in (1, 2):
        save_checkpoint(root, step, chunks, meta={"stage": 0})
    step2 = os.path.join(root, "iter_0000002")
    shard = sorted(n for n in os.listdir(step2) if n.endswith(".distcp"))[0]
    with open(os.path.join(step2, shard), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(step2, shard)) // 2)
    error_of("damaged", lambda: load_checkpoint(root, chunks, weights_only=True))
    return {"shard": os.path.join(step2, shard), "step1": os.path.join(root, "iter_0000001")}


def _rename_fails_in_publishing(root, chunks) -> dict:
    """Step 1 saved; the rename of step 2's tmp dir into place fails: what the marker names after."""
    from megasail import checkpoint

    checkpoint.save_checkpoint(root, 1, chunks, meta={"stage": 0})
    real_rename = os.rename

    def failing(src, dst):
        if str(dst).endswith("iter_0000002"):
            raise OSError("rename refused (planted)")
        return real_rename(src, dst)

    os.rename = failing
    try:
        checkpoint.save_checkpoint(root, 2, chunks, meta={"stage": 0})
        raised = False
    except OSError:
        raised = True
    finally:
        os.rename = real_rename
    with open(os.path.join(root, checkpoint.MARKER)) as f:
        return {"raised": raised, "marker": f.read().strip(), "latest": checkpoint.latest_checkpoint(root)}


def _bf16_weights_only(root) -> dict:
    """bf16 weights saved, loaded weights-only into a model from another seed with its optimizer built,
    then one step at lr 0: {state-dict name: whether the weight still equals the saved one}."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megasail.checkpoint import load_checkpoint, save_checkpoint
    from megasail.config import ParallelConfig
    from megasail.training import build_model_chunks, wrap_ddp

    def build(seed):
        from megasail.runtime import initialize

        initialize(1, 1, seed=seed)
        cfg = tiny_model_config(-1, precision="bf16")
        chunks = build_model_chunks(cfg, ParallelConfig())
        wrapped = wrap_ddp(chunks, ParallelConfig())
        config = OptimizerConfig(optimizer="adam", lr=0.0, bf16=True, use_distributed_optimizer=True)
        return cfg, chunks, wrapped, get_megatron_optimizer(config, wrapped)

    _, chunks, _, _ = build(seed=1)
    save_checkpoint(root, 0, chunks, meta={})
    saved = _local_weights(chunks[0])
    cfg, chunks, wrapped, opt = build(seed=99)
    load_checkpoint(root, wrapped, opt, weights_only=True)
    batch = _batch(cfg, 1)
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    sched = type("NoSchedule", (), {"step": lambda self, n: None})()
    _train_step(wrapped, opt, sched, [batch])
    now = _local_weights(chunks[0])
    return {k: torch.equal(now[k], v) for k, v in saved.items()}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    run_distributed_test(_single_process, 1, str(tmp / "ckpt"), str(tmp / "result.pt"))
    return torch.load(tmp / "result.pt", weights_only=True)


class _StandInTE:
    """The backend megatron-core's TESpecProvider is, with empty stand-in classes carrying the names of
    megatron-core's TE modules: it yields the layer spec specs.py builds on a machine with TE."""

    classes = {
        name: type(name, (), {})
        for name in (
            "TENorm",
            "TELayerNormColumnParallelLinear",
            "TEColumnParallelLinear",
            "TERowParallelLinear",
            "TEDotProductAttention",
        )
    }

    def layer_norm(self, *args, **kwargs):
        return self.classes["TENorm"]

    def column_parallel_layer_norm_linear(self):
        return self.classes["TELayerNormColumnParallelLinear"]

    def column_parallel_linear(self):
        return self.classes["TEColumnParallelLinear"]

    def row_parallel_linear(self):
        return self.classes["TERowParallelLinear"]

    def core_attention(self):
        return self.classes["TEDotProductAttention"]


# TE's LayerNormLinear names the parameters of the norm it fuses layer_norm_weight / layer_norm_bias
TE_FUSED_NORM_PARAMS = {"weight": "layer_norm_weight", "bias": "layer_norm_bias"}


def _te_layer_key(name: str, te_layer_spec) -> str:
    """A layer-local parameter name of the local spec -> its name in the TE-spec layer.

    A pre-norm that the TE spec replaces by IdentityOp lives in the linear that consumes its output
    (TransformerLayer: input_layernorm -> self_attention.linear_qkv, pre_mlp_layernorm -> mlp.linear_fc1)
    when that linear is TE's LayerNormColumnParallelLinear; every other name is the same in both specs.
    """
    from megatron.core.transformer.identity_op import IdentityOp

    sub = te_layer_spec.submodules
    consumers = {
        "input_layernorm": ("self_attention.linear_qkv", sub.self_attention.submodules.linear_qkv),
        "pre_mlp_layernorm": ("mlp.linear_fc1", sub.mlp.submodules.linear_fc1),
    }
    module, _, param = name.rpartition(".")
    if module in consumers and getattr(sub, module) is IdentityOp:
        path, consumer = consumers[module]
        assert consumer.__name__ == "TELayerNormColumnParallelLinear", (
            f"{module} vanished without a fused norm"
        )
        return f"{path}.{TE_FUSED_NORM_PARAMS[param]}"
    return name


@pytest.mark.distributed
def test_local_spec_saves_te_key_names(single_process, monkeypatch):
    """The local model's checkpoint keys equal the TE-spec model's parameter names, for the LLM (RMSNorm)
    and the ViT (LayerNorm, with bias) layers.

    Transformer Engine cannot be imported here, so the TE names are derived without it: specs.py builds
    its TE layer specs with a stand-in TE backend (classes named as megatron-core's TE modules), and each
    local parameter is renamed by that spec's structure (which norm became IdentityOp, which linear fuses
    it) and TE LayerNormLinear's parameter names. Two outside checks pin that oracle: megatron-core's own
    TRT-LLM export table lists the fused names as TE's layer-norm weights, and the HF converter's
    to_te_layout (which tests/test_gpu.py loads into a real TE model) gives the same names.
    ``_extra_state`` entries are left out: TE has one more (core_attention), and loads tolerate them.

    Fails if: the local spec has no sharded_state_dict_keys_map (keys stay input_layernorm.weight); the map
    is applied to the LLM layers only (ViT keys differ); it maps to "layer_norm." instead of "layer_norm_".
    """
    import re

    from megatron.core.export.trtllm.model_to_trllm_mapping.default_conversion_dict import (
        DEFAULT_CONVERSION_DICT,
    )

    from megasail.convert.hf_internvl import to_te_layout
    from megasail.models import specs

    monkeypatch.setattr(
        specs, "_backend", lambda use_te: _StandInTE() if use_te else specs.LocalSpecProvider()
    )
    te_specs = {
        "vision_model": specs.vision_layer_spec(True, 1.0),
        "language_model": specs.language_layer_spec(True, False),
    }
    expected = set()
    for key in single_process["state_dict"]:
        m = re.match(r"^(vision_model|language_model)(\.decoder\.layers\.\d+\.)(.+)$", key)
        if m:
            te_name = _te_layer_key(m[3], te_specs[m[1]])
            if te_name != m[3]:
                assert f"decoder.layers.{te_name}" in DEFAULT_CONVERSION_DICT, (
                    te_name
                )  # megatron-core's TE names
            key = m[1] + m[2] + te_name
        expected.add(key)
    saved = {k for k in single_process["sharded"] if not k.endswith("_extra_state")}
    assert saved == expected, (
        f"saved but not TE: {sorted(saved - expected)[:8]}; TE but not saved: {sorted(expected - saved)[:8]}"
    )
    assert any(
        ".decoder.layers.0.self_attention.linear_qkv.layer_norm_bias" in k for k in saved
    )  # ViT LayerNorm
    assert set(to_te_layout(dict.fromkeys(single_process["state_dict"]))) == expected


@pytest.mark.distributed
def test_bad_loads_name_what_is_wrong(single_process):
    """Loading the optimizer from a weights-only checkpoint, a model with fewer layers or another
    vocabulary, or an empty root fails with a message naming the keys, shapes or paths involved.

    Fails if: the key check is skipped (dist_checkpointing's own error names neither side, or the
    extra layer is silently ignored); a weights-only checkpoint is not recognised as one (the error
    would then blame frozen parameters)."""
    errors = single_process["errors"]
    assert "has model weights only (no optimizer state)" in errors["optimizer_from_weights_only"]
    assert "weights_only=True" in errors["optimizer_from_weights_only"]
    assert "language_model.decoder.layers.3.self_attention.linear_qkv.weight" in errors["fewer_layers"]
    assert "match no parameter of this model" in errors["fewer_layers"]
    vocab = errors["bigger_vocab"]
    assert "has a vocabulary of 256 (language_model.embedding.word_embeddings.weight), this run builds 320" in vocab
    assert vocab.endswith("set model.language.vocab_size=256") and "\n" not in vocab  # one line
    assert errors["empty_root"].startswith("FileNotFoundError") and "nothing" in errors["empty_root"]


@pytest.mark.distributed
def test_a_damaged_shard_names_the_file_and_the_step_to_fall_back_to(single_process):
    """A .distcp file of the newest step cut short (a copy or a write interrupted): the load error names
    that file, the step and the previous published step (one line), not a bare EOFError.

    Fails if shard lengths are not checked against the checkpoint's metadata on a failed load."""
    error, damaged = single_process["errors"]["damaged"], single_process["damaged"]
    assert error.startswith("CheckpointCorruptError") and "\n" not in error
    assert damaged["shard"] in error and "its metadata needs" in error
    assert f"checkpoint.load={damaged['step1']}" in error


@pytest.mark.distributed
def test_marker_moves_only_after_the_step_dir_is_in_place(single_process):
    """The rename of a step's tmp dir into place fails inside publishing: the marker still names the
    previous step, which still loads.

    Fails if the marker is written before the step dir is renamed into place (it would name step 2,
    whose directory does not exist)."""
    publish = single_process["publish"]
    assert publish["raised"] and publish["marker"] == "1"
    assert publish["latest"].endswith("iter_0000001")


@pytest.mark.distributed
def test_weights_only_load_refreshes_bf16_main_weights(single_process):
    """bf16 training steps from fp32 main weights the optimizer copied when it was built: after a
    weights-only load with the optimizer passed in, a step at lr 0 leaves the loaded weights in place.
    Fails if the optimizer's main weights are not refreshed (the step writes the seed-99 init back)."""
    unchanged = single_process["bf16"]
    assert unchanged and all(unchanged.values()), [k for k, same in unchanged.items() if not same][:5]


def _te_and_local_keys(rank, world_size, out_path):
    from megasail.checkpoint import model_sharded_state_dict
    from megasail.models.sail_vl import SailVLModel
    from megasail.runtime import initialize

    initialize(1, 1, seed=0)
    keys = {}
    for impl in ("te", "local"):
        merged, _ = model_sharded_state_dict(
            [SailVLModel(tiny_model_config(-1, transformer_impl=impl)).cuda()]
        )
        keys[impl] = sorted(k for k in merged if not k.endswith("_extra_state"))
    torch.save(keys, out_path)


@pytest.mark.gpu
@pytest.mark.distributed
def test_te_and_local_models_have_the_same_checkpoint_keys(tmp_path):
    """On a machine with Transformer Engine: the TE and the local model write the same keys.
    Fails if the local spec's keys map is missing or differs from TE's fused-norm names."""
    from megasail.models.specs import HAVE_TE

    if not HAVE_TE:
        pytest.skip("transformer_engine does not import here")
    run_distributed_test(_te_and_local_keys, 1, str(tmp_path / "keys.pt"))
    keys = torch.load(tmp_path / "keys.pt", weights_only=True)
    assert keys["te"] == keys["local"], set(keys["te"]) ^ set(keys["local"])


if __name__ == "__main__":  # the kill -9 test's child process (dist_checkpointing needs this guard)
    _run_role(*sys.argv[1:4])
