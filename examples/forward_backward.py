"""Build a SAIL-VL model from a config, run one training step on synthetic image-text batches with
megatron-core's pipeline schedule, DDP and optimizer, and print the loss and parameter counts.

    torchrun --nproc-per-node 2 examples/forward_backward.py --config examples/configs/tiny.yaml parallel.tensor=2
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from megasail.config import config_help, load_config


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=False, help="YAML config (examples/configs/*.yaml)")
    ap.add_argument("--seq-length", type=int, default=1024, help="tokens per sample (default 1024)")
    ap.add_argument("--tiles", default="1,3", help="tiles per sample in a micro-batch, e.g. '1,3' (0 = text only)")
    ap.add_argument("--micro-batches", type=int, default=2, help="micro-batches in the step (pipeline fill)")
    ap.add_argument("--help-config", action="store_true", help="print every config key with its doc and exit")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tensor=2")
    args = ap.parse_intermixed_args(argv)
    if args.help_config:
        print(config_help())
        sys.exit(0)
    if not args.config:
        ap.error("--config is required")
    return args


def main(argv=None) -> float | None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    # megatron-core after megasail: the package filters megatron's import-time fallback warnings
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megasail.models.param_count import global_param_counts
    from megasail.models.synthetic import synthetic_batch
    from megasail.runtime import destroy, initialize
    from megasail.training.model_builder import build_model_chunks, wrap_ddp
    from megasail.training.step import forward_step, reported_loss

    p = cfg.parallel
    initialize(p.tensor, p.pipeline, p.virtual_pipeline, p.context, seed=cfg.seed)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.model.precision]
    model = wrap_ddp(build_model_chunks(cfg.model, p), p)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, bf16=dtype == torch.bfloat16,
                        params_dtype=dtype, use_distributed_optimizer=p.distributed_optimizer),
        model,
    )
    tiles = [int(t) for t in args.tiles.split(",")]
    batches = [synthetic_batch(cfg.model, args.seq_length, tiles, seed=i, dtype=dtype)
               for i in range(args.micro_batches)]
    data = iter(batches) if len(model) == 1 else [iter(batches) for _ in model]
    for m in model:
        m.zero_grad_buffer()  # fresh model: the optimizer has no stale grads to clear
    start = time.perf_counter()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=model if len(model) > 1 else model[0],
        num_microbatches=args.micro_batches, seq_length=args.seq_length, micro_batch_size=len(tiles),
        forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    elapsed = time.perf_counter() - start

    counts = global_param_counts(model)
    loss = None
    if parallel_state.is_pipeline_last_stage():
        loss = reported_loss(losses)  # token-weighted over the step's micro-batches
    # report from one rank: the last pipeline stage's first TP / DP rank holds the loss
    reporter = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0)
    if reporter:
        world = dist.get_world_size()
        print(f"[megasail] world={world} tp={p.tensor} pp={p.pipeline} dp={parallel_state.get_data_parallel_world_size()} "
              f"sp={p.sequence_parallel} backend={dist.get_backend()}")
        print("[megasail] parameters: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))
        print(f"[megasail] step: loss={loss:.6f} grad_norm={grad_norm:.6f} update_ok={ok} time={elapsed:.2f}s "
              f"({args.micro_batches} micro-batches of {len(tiles)} x {args.seq_length} tokens, tiles {tiles})")
    destroy()
    return loss


if __name__ == "__main__":
    main()
