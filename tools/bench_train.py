#!/usr/bin/env python
"""Whole optimizer steps of the training loop (loader, schedule, optimizer) beside a plain GPTModel.

    python tools/bench_train.py                                       # tiny config, TP=2 and PP=2 on 2 CPU processes
    python tools/bench_train.py --config examples/configs/sail_vl_2b.yaml --data data/caption_00 \\
        --nproc 8 --layouts "tp=1;tp=2;tp=2,fp8" data.seq_length=8192 data.global_batch_size=64

For each layout, torchrun starts --nproc processes that run the training loop's own step
(megasail.training.loop.Trainer.train_step: loader.next_step, megatron's pipeline schedule,
DDP, distributed optimizer, LR schedule) on --data for --warmup + --steps steps, taking turns
step by step with megatron-core's plain GPTModel with the same LLM (text only, the same token slots
per step, megatron's schedule, DDP and optimizer), so load drift on a shared machine hits both
alike. Rows report medians over the timed steps:

  step s            wall time of one optimizer step (slowest rank)
  tokens/s          sample tokens per second (padding excluded; GPT: every slot is a token)
  slots/s           token slots (global batch x seq_length) per second
  TFLOP/s/device    model FLOPs per second per process, by the one convention of megasail.models.flops
                    (real tokens only, causal attention per sample, ViT per tile, frozen parts charged
                    what their backward runs), as the loop logs them
  MFU / HFU         the loop's mfu / hfu (HFU adds train.recompute's recomputation): FLOPs over this GPU's
                    dense peak, FP8 parts against the FP8 peak (n/a on CPU)
  bubble            1F1B pipeline idle share (p - 1) / (v m + p - 1) at PP > 1
  split             LLM layers on pipeline stage 0 (which also runs the ViT): the ViT-aware split of
                    megasail.models.flops.suggest_first_stage_layers unless --even-split or
                    parallel.first_stage_llm_layers is given
  est GiB           memory of rank 0 (pipeline stage 0) by megasail.models.memory, the model the plan and
                    the start-up check use, at the dataset's tiles per sequence
  peak GB           rank 0's metrics mem_gb: torch.cuda.max_memory_allocated on a GPU, the process's
                    peak RSS on a CPU (plus the interpreter and libraries, about 0.6 GB); either also
                    holds the GPT model timed beside it, so it bounds the estimate from above

Without --data a small synthetic caption set is made (tools/make_synthetic_data.py, then
tools/preprocess_data.py at --max-tiles 1) in a temporary directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/configs/tiny.yaml", help="run config YAML")
    ap.add_argument("--data", default=None, help="dataset prefix; default: synthetic captions in a temp dir")
    ap.add_argument("--layouts", default="tp=2;pp=2", help="';'-separated layouts: tp=N,pp=N,vpp=N,fp8")
    ap.add_argument("--nproc", type=int, default=2, help="processes per layout (torchrun --nproc-per-node)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per row")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--even-split", action="store_true", help="split LLM layers evenly over pipeline stages")
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # result file; set by the launcher
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.seq_length=2048")
    return ap.parse_intermixed_args(argv)


def layout_overrides(layout: str) -> list[str]:
    """'tp=2,pp=2,fp8' -> config overrides."""
    keys = {"tp": "parallel.tensor", "pp": "parallel.pipeline", "vpp": "parallel.virtual_pipeline"}
    out = []
    for item in filter(None, (x.strip() for x in layout.split(","))):
        if item == "fp8":
            out.append("model.fp8=hybrid")
            continue
        key, _, value = item.partition("=")
        if key not in keys or not value.isdigit():
            raise SystemExit(
                f"bench_train: bad layout item {item!r} in {layout!r} (use tp=N, pp=N, vpp=N, fp8)"
            )
        out.append(f"{keys[key]}={value}")
    return out


def synthetic_prefix(directory: str, seq_length: int) -> str:
    """Synthetic captions preprocessed at one tile per image; returns the dataset prefix."""
    raw, prefix = os.path.join(directory, "raw"), os.path.join(directory, "train")
    env = dict(os.environ, PYTHONPATH=REPO)
    for cmd in (
        [sys.executable, f"{REPO}/tools/make_synthetic_data.py", "--output", raw, "--samples", "400"],
        [
            sys.executable,
            f"{REPO}/tools/preprocess_data.py",
            "--input",
            f"{raw}/captions.jsonl",
            "--tokenizer",
            f"{raw}/tokenizer",
            "--max-tiles",
            "1",
            "--max-seq-length",
            str(seq_length),
            "--output-prefix",
            prefix,
            "--no-progress",
        ],
    ):
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return prefix


def tiles_per_sequence(prefix: str, seq_length: int, tokens_per_tile: int) -> float:
    """Image tiles in a full sequence, from the manifest's token counts (at the dataset's max tiles)."""
    with open(prefix + ".manifest.json") as f:
        tokens = json.load(f)["tokens"]
    image_tokens = tokens["total_at_max_tiles"] - tokens["text"]
    return seq_length * image_tokens / max(tokens["total_at_max_tiles"], 1) / tokens_per_tile


# ---------------------------------------------------------------- worker (one layout, under torchrun)
def gpt_step(cfg, trainer):
    """One whole optimizer step of megatron's GPTModel with the run's LLM on random text of the step's
    shape (same micro-batches, micro-batch size and sequence length); returns (step(), FLOPs per step)."""
    from functools import partial

    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megasail.models import specs
    from megasail.models.flops import FlopsModel
    from megasail.models.mcore_config import language_transformer_config
    from megasail.training.model_builder import wrap_ddp
    from megasail.training.optim import build_optimizer, optimizer_step
    from megasail.training.step import batch_to_device, masked_loss_sum

    lm, d = cfg.model.language, cfg.data
    # no ViT in front of GPT: its best pipeline split is the even one
    p = dataclasses.replace(cfg.parallel, first_stage_llm_layers=None)
    config = language_transformer_config(cfg.model, p)
    use_te = specs.use_transformer_engine(cfg.model.transformer_impl)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=specs.language_block_spec(config, use_te, False),
        vocab_size=lm.vocab_size,
        max_sequence_length=lm.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
        parallel_output=True,
        share_embeddings_and_output_weights=not lm.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=lm.rotary_base,
    )
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    model = wrap_ddp([gpt], p)
    optimizer = build_optimizer(cfg, model, trainer.run_state.stage)
    m = trainer.loader.microbatches_per_step
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.vocab_size, (m, d.micro_batch_size, d.seq_length + 1), generator=gen)
    positions = torch.arange(d.seq_length).expand(d.micro_batch_size, -1)
    ones = torch.ones(d.micro_batch_size, d.seq_length)
    batches = [
        {"input_ids": x[:, :-1], "labels": x[:, 1:], "position_ids": positions, "loss_mask": ones}
        for x in ids
    ]

    def forward(data_iterator, chunk):
        b = batch_to_device(next(data_iterator))
        losses = chunk(
            input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=None, labels=b["labels"]
        )
        return losses, partial(masked_loss_sum, b["loss_mask"])

    def step() -> None:
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward,
            data_iterator=iter(batches),
            model=model[0],
            num_microbatches=m,
            seq_length=d.seq_length,
            micro_batch_size=d.micro_batch_size,
            forward_only=False,
        )
        optimizer_step(optimizer)

    # GPT runs without recomputation: its hardware FLOPs are its model FLOPs
    flops = FlopsModel.from_config(cfg.model).step_flops(0, [d.seq_length] * d.global_batch_size, ["language"])
    return step, flops


def _median_or_none(values: list) -> float | None:
    return None if any(v is None for v in values) else statistics.median(values)


def slowest_seconds(fn) -> float:
    """Wall time of fn() on the slowest rank."""
    import time

    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    start = time.perf_counter()
    fn()
    if device is not None:
        torch.cuda.synchronize()
    t = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from megasail.config import load_config
    from megasail.models import memory
    from megasail.models.flops import step_metrics, suggest_first_stage_layers
    from megasail.models.specs import use_transformer_engine
    from megasail.plan import pipeline_bubble
    from megasail.runtime import destroy, init_process_group, initialize
    from megasail.training.checks import check_run
    from megasail.training.loop import Trainer

    cfg = load_config(args.config, args.overrides + [f"data.path={args.data}", "logging.wandb=false"])
    cfg.logging.dir, cfg.checkpoint.save, cfg.checkpoint.load = None, None, None
    cfg.train.iters = args.warmup + args.steps  # the one-stage run's schedule spans the benchmark
    p, d = cfg.parallel, cfg.data
    if p.pipeline > 1 and p.first_stage_llm_layers is None and not args.even_split:
        tiles = tiles_per_sequence(args.data, d.seq_length, cfg.model.tokens_per_tile)
        p.first_stage_llm_layers = suggest_first_stage_layers(
            cfg.model, p.pipeline, d.seq_length, tiles, p.virtual_pipeline
        )
    init_process_group(cfg.train.timeout_minutes)
    check_run(cfg, dist.get_world_size())
    initialize(p.tensor, p.pipeline, p.virtual_pipeline, p.context, seed=cfg.seed)
    layout = memory.MemoryLayout.from_run(
        cfg, dist.get_world_size() // (p.tensor * p.pipeline * p.context),
        tiles_per_sequence(args.data, d.seq_length, cfg.model.tokens_per_tile),
        flash_attention=use_transformer_engine(cfg.model.transformer_impl),
        device="gpu" if torch.cuda.is_available() else "cpu",
    )
    estimate = memory.stage_memory(cfg.model, layout, cfg.data.stages[0].trainable)[0]
    trainer = Trainer(cfg)
    gpt, gpt_flops = gpt_step(cfg, trainer)
    metrics, gpt_times = [], []
    for i in range(args.warmup + args.steps):  # the two models take turns, so load drift hits both alike
        m = trainer.train_step()
        if m is None:
            raise SystemExit(
                f"bench_train: {args.data} ran out after {i} steps; give more data or fewer --steps"
            )
        seconds = slowest_seconds(gpt)
        if i >= args.warmup:
            metrics.append(m)
            gpt_times.append(seconds)
    med = {
        k: statistics.median(x[k] for x in metrics)
        for k in ("step_time", "tokens_per_s", "tflops_per_device")
    }
    slots = d.global_batch_size * d.seq_length
    common = {
        "tp": p.tensor,
        "pp": p.pipeline,
        "vpp": p.virtual_pipeline,
        "fp8": cfg.model.fp8 is not None,
        "world": dist.get_world_size(),
        "split": p.first_stage_llm_layers,
        "bubble": pipeline_bubble(p.pipeline, trainer.loader.microbatches_per_step, p.virtual_pipeline),
    }
    rows = [
        {
            "model": "sailvl",
            "step_s": med["step_time"],
            "tokens_per_s": med["tokens_per_s"],
            "slots_per_s": slots / med["step_time"],
            "tflops_per_device": med["tflops_per_device"],
            "mfu": _median_or_none([x["mfu"] for x in metrics]),
            "hfu": _median_or_none([x["hfu"] for x in metrics]),
            "losses": [x["loss"] for x in metrics],
            "est_mem_gib": estimate.total / memory.GIB,
            "mem_gb": max(x["mem_gb"] for x in metrics),
        }
    ]
    gpt_s = statistics.median(gpt_times)
    gpt_measured = step_metrics(gpt_flops, gpt_s, dist.get_world_size(), trainer.peak)
    rows.append(
        {
            "model": "gpt",
            "step_s": gpt_s,
            "tokens_per_s": slots / gpt_s,
            "slots_per_s": slots / gpt_s,
            "tflops_per_device": gpt_measured["tflops_per_device"],
            "mfu": gpt_measured["mfu"],
            "hfu": gpt_measured["hfu"],
        }
    )
    if dist.get_rank() == 0:
        with open(args.worker, "w") as f:
            json.dump([{**common, **r} for r in rows], f)
    destroy()


# ---------------------------------------------------------------- launcher
def format_table(rows: list[dict]) -> str:
    lines = [
        "| model | layout | step s | tokens/s | slots/s | TFLOP/s/device | MFU | HFU | bubble | split "
        "| est GiB | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        layout = (
            f"TP={r['tp']} PP={r['pp']}"
            + (f" VPP={r['vpp']}" if r["vpp"] else "")
            + (" FP8" if r["fp8"] else "")
        )
        mfu, hfu = (f"{r[k]:.1%}" if r[k] is not None else "n/a" for k in ("mfu", "hfu"))
        bubble = f"{r['bubble']:.1%}" if r["pp"] > 1 else "-"
        split = (str(r["split"] or "even")) if r["pp"] > 1 and r["model"] == "sailvl" else "-"
        lines.append(
            f"| {r['model']} | {layout} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['slots_per_s']:,.0f} | {r['tflops_per_device']:.4f} | {mfu} | {hfu} | {bubble} | {split} "
            "| "
            + (f"{r['est_mem_gib']:.2f} | {r['mem_gb']:.2f} |" if "est_mem_gib" in r else "- | - |")
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return []
    from megasail.config import load_config

    cfg = load_config(args.config, args.overrides)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        data = args.data or synthetic_prefix(tmp, cfg.data.seq_length)
        for layout in filter(None, (x.strip() for x in args.layouts.split(";"))):
            result = os.path.join(tmp, "result.json")
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(args.nproc),
                os.path.abspath(__file__),
                "--worker",
                result,
                "--config",
                args.config,
                "--data",
                data,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                *(["--even-split"] if args.even_split else []),
                *args.overrides,
                *layout_overrides(layout),
            ]
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
            env.setdefault("OMP_NUM_THREADS", "1")
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"bench_train: layout {layout!r} failed (exit {proc.returncode})")
            with open(result) as f:
                rows += json.load(f)
    print(
        f"config {args.config}, {args.nproc} processes, medians of {args.steps} steps after {args.warmup} warm-up; "
        f"{cfg.data.global_batch_size} x {cfg.data.seq_length} token slots per step"
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
