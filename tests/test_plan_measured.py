"""The plan (``python -m megasail.plan``) against a measured run of the training loop on CPU: memory per
rank at two layouts (TP=1 in one process, PP=2 over two) and the time of N steps at the measured tokens/s.

The measure of memory: each rank resets its peak resident set (``/proc/self/clear_refs``) just before
the Trainer builds the model and reads ``VmHWM`` after the steps; the peak minus the RSS at the reset,
less the growth of file-backed RSS (``RssFile``: shared-library code and mapped dataset files first read
during the run, about 55 MiB, which no model of the run's memory predicts), is what the model,
optimizer, activations, batches and Python objects added. It includes allocator slack and the
interpreter's own objects (about 10 MiB here) and excludes what was resident before the build
(interpreter, torch, megatron). glibc's malloc keeps freed heap memory and lets RSS creep up step after
step (this config's peak: 536 MiB after one step, 875 MiB after 16); ``MALLOC_MMAP_THRESHOLD_`` fixed at
128 KiB gives every tensor above that its own mapping, returned to the system when freed, so RSS follows
the live tensors as ``torch.cuda.max_memory_allocated`` does on a GPU. The same measure after the last
step (``VmRSS`` then, no activation or batch alive) is what the weights, gradient buffer and optimizer
state hold; the plan's sum of those three is held to it separately.

The config is sized so that the model and its activations (about 390 MiB on one process, largest rank
440 MiB under PP=2) dwarf what the measure adds besides them (about 10 MiB), while a step stays a few
seconds on a CPU core: a 4-layer LLM of width 128 with a 16,384-token vocabulary (logits 64 MiB per
micro-batch), 1,024-token sequences (unfused softmax 16 MiB per layer), the 2-layer ViT on about three
448px tiles per micro-batch (48 MiB of softmax per layer), two micro-batches per step.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import pytest
from dist_utils import run_distributed_test
from train_utils import make_datasets, tiny_run_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = [
    "data.seq_length=1024",
    "data.global_batch_size=2",
    "model.language.num_layers=4",
    "model.language.hidden_size=128",
    "model.language.ffn_hidden_size=256",
    "model.language.vocab_size=16384",
    "model.vision.num_layers=2",
    "data.pack_window=64",  # rows filled alike: a step's time follows its tokens
    "data.pack_chunk_samples=64",
]
SKIP = 3  # --metrics-skip: the first steps allocate the optimizer state and warm up


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {
            line.split(":")[0]: int(line.split()[1]) * 1024
            for line in f
            if line.startswith(("VmRSS:", "VmHWM:", "RssFile:"))
        }


def _train_and_measure(rank, world_size, overrides, out_dir, steps):
    """pretrain()'s start-up, then the Trainer's steps with the memory measure of the module docstring."""
    import torch.distributed as dist

    from megasail.config import to_yaml
    from megasail.runtime import init_process_group, initialize
    from megasail.training.checks import check_run
    from megasail.training.loop import Trainer

    cfg = tiny_run_config(overrides)
    init_process_group(cfg.train.timeout_minutes)
    check_run(cfg, dist.get_world_size())
    p = cfg.parallel
    initialize(p.tensor, p.pipeline, p.virtual_pipeline, p.context, seed=cfg.seed)
    if rank == 0:
        resolved = to_yaml(cfg).replace(f"path: {cfg.data.path}", "path: null")  # data.stages says it all
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            f.write(resolved)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM starts again from the current RSS
    before = _status()
    trainer = Trainer(cfg)
    tiles = []
    fetch = trainer.loader.next_step

    def next_step():
        batches = fetch()
        tiles.extend(b["pixel_values"].shape[0] for b in batches if b.get("pixel_values") is not None)
        return batches

    trainer.loader.next_step = next_step
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        seconds.append(time.perf_counter() - start)
    trainer.metrics.close()
    if trainer.loader.reader is not None:  # the in-process loader's reusable pixel buffers: not state
        trainer.loader.reader.builder.pixel_pool.release()
    gc.collect()
    after = _status()
    added_files = after["RssFile"] - before["RssFile"]
    measured = after["VmHWM"] - before["VmRSS"] - added_files
    held = after["VmRSS"] - before["VmRSS"] - added_files  # between steps: no activations, no batches
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"measured": measured, "held": held, "tiles": tiles, "seconds": seconds}, f)


def _plan(out_dir, world: int, tiles: float, steady_steps: int) -> dict:
    """The plan's JSON for the run's resolved config: steady_steps at the measured throughput (0: memory
    only, at a stated throughput)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    metrics = os.path.join(out_dir, "logs", "metrics.jsonl")
    timing = (
        ["--from-metrics", metrics, "--metrics-gpus", str(world), "--metrics-skip", str(SKIP)]
        if steady_steps
        else ["--tokens-per-s-per-gpu", "1"]
    )
    cmd = [
        sys.executable,
        "-m",
        "megasail.plan",
        "--config",
        os.path.join(out_dir, "config.yaml"),
        "--nodes",
        "1",
        "--gpus-per-node",
        str(world),
        "--device",
        "cpu",
        "--tiles-per-sequence",
        str(tiles),
        *timing,
        "--json",
        f"train.iters={max(steady_steps, 1)}",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env | {"PYTHONPATH": REPO}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """TP=1 (3 steps) and PP=2 (SKIP + 4 steps, with metrics.jsonl) of the sized tiny config."""
    root = tmp_path_factory.mktemp("plan_measured")
    data = make_datasets(str(root / "data"))["a"]
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # read by glibc when each spawned rank starts
    try:
        out = {}
        for name, world, steps, layout in (("tp1", 1, 3, []), ("pp2", 2, SKIP + 4, ["parallel.pipeline=2"])):
            out_dir = root / name
            (out_dir / "logs").mkdir(parents=True)
            overrides = (
                SIZE
                + layout
                + [f"data.path={data}", f"logging.dir={out_dir / 'logs'}", f"train.iters={steps}"]
            )
            run_distributed_test(_train_and_measure, world, overrides, str(out_dir), steps)
            ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]
            tiles = max(ranks[0]["tiles"])
            steady = steps - SKIP if name == "pp2" else 0
            out[name] = {"ranks": ranks, "plan": _plan(out_dir, world, tiles, steady), "steps": steps}
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    return out


@pytest.mark.parametrize("layout", ["tp1", "pp2"])
def test_plan_memory_within_20_percent_of_the_measured_peak_per_rank(runs, layout):
    """Each pipeline rank's planned memory is within 20% of its measured peak (module docstring); under
    PP=2 stage 0 (ViT, embedding, two micro-batches in flight) and stage 1 (one micro-batch, logits)
    differ by more than 2x, and each is held to its own measure.

    Fault caught: stage 0 charged one in-flight micro-batch instead of pp (PP rank 0 planned at 0.60x),
    the logits left out of the last stage (PP rank 1 at 0.59x), the unfused softmax of the LLM and the
    ViT dropped (0.58x at TP=1), PP ignored (every rank planned with the whole model: PP rank 0 at 1.52x)."""
    run = runs[layout]
    memory = run["plan"]["stages"][0]["memory"]
    assert len(memory) == len(run["ranks"])
    for rank, (planned, measured) in enumerate(zip(memory, run["ranks"], strict=True)):
        planned_bytes = planned["total_gib"] * 2**30
        print(
            f"{layout} rank {rank}: planned {planned_bytes / 2**20:.1f} MiB, measured "
            f"{measured['measured'] / 2**20:.1f} MiB, ratio {planned_bytes / measured['measured']:.3f}"
        )
        assert planned_bytes == pytest.approx(measured["measured"], rel=0.2), (
            f"{layout} rank {rank}: planned {planned_bytes / 2**20:.0f} MiB, measured "
            f"{measured['measured'] / 2**20:.0f} MiB; plan {planned}"
        )


@pytest.mark.parametrize("layout", ["tp1", "pp2"])
def test_plan_state_within_20_percent_of_what_each_rank_holds_between_steps(runs, layout):
    """Each pipeline rank's planned weights, fp32 gradient buffer and Adam state are within 20% of what
    it holds after its last step (resident set after the step, less the resident set before the build
    and added file-backed pages: the module docstring's measure, taken when no activation or batch is
    alive; the in-process loader's reused pixel buffers are released first: up to 4 micro-batches'
    pixels kept for the next steps, loader memory that the peak's inputs term covers). Here that state is about a fifth of the peak, too little for the peak alone to miss it.

    Fault caught: the optimizer state term dropped (planned at 0.46x; the peak test still passed at
    0.86-0.94x), the fp32 gradient buffer dropped (0.66x; the peak at 0.91-0.96x)."""
    run = runs[layout]
    memory = run["plan"]["stages"][0]["memory"]
    for rank, (planned, measured) in enumerate(zip(memory, run["ranks"], strict=True)):
        state = sum(planned[k] for k in ("weights_gib", "grads_gib", "optimizer_gib")) * 2**30
        print(
            f"{layout} rank {rank}: state planned {state / 2**20:.1f} MiB, held {measured['held'] / 2**20:.1f}"
            f" MiB, ratio {state / measured['held']:.3f}"
        )
        assert state == pytest.approx(measured["held"], rel=0.2), (layout, rank, planned, measured["held"])


def test_plan_time_within_20_percent_of_the_measured_steps(runs):
    """The plan of the steady steps at the measured throughput (--from-metrics on the run's own
    metrics.jsonl, median tokens/s of the steps after the first SKIP, per GPU over the two processes)
    takes within 20% of the wall time those steps took.

    Fault caught: the all-GPU tokens/s not divided by --metrics-gpus (planned at 0.40x). Which rows
    are steady and the run's packing efficiency are held exactly in tests/test_recipes.py."""
    run = runs["pp2"]
    steady = run["steps"] - SKIP
    measured = sum(run["ranks"][0]["seconds"][SKIP:])
    (stage,) = run["plan"]["stages"]
    assert stage["iterations"] == steady
    planned = stage["iterations"] * stage["step_seconds"]
    print(
        f"{steady} steps: planned {planned:.1f} s, measured {measured:.1f} s, ratio {planned / measured:.3f}"
    )
    assert planned == pytest.approx(measured, rel=0.2), (planned, run["ranks"][0]["seconds"])
    assert "metrics.jsonl" in stage["tokens_per_s_source"]
