#!/usr/bin/env python
"""Checkpoint save time and the saving ranks' peak memory at several data-parallel sizes.

    python tools/bench_save.py                                   # ~200M parameters at DP=2 and DP=4 on CPU
    python tools/bench_save.py --dp 2 --repeats 1 model.language.num_layers=2     # quick look

For each --dp size torchrun starts that many processes (gloo on CPU, nccl on GPU) that build the
--config model (the tiny config widened to a ~200M-parameter language model by default, see
DEFAULT_OVERRIDES), wrap it in megatron DDP with the distributed optimizer, fill Adam's state, and
save it --repeats times through megasail.checkpoint.save_checkpoint into a temporary directory.
Rows report, for each DP size and --sharding (the optimizer layout, checkpoint.optimizer_sharding, as the
saved megasail.json names it):

  params          parameters of the model (all trained)
  save s          wall time of one save, barrier to barrier (median over the repeats; slowest rank)
  rank 0 peak     the highest resident set size (VmHWM of /proc/self/status, reset through
                  /proc/self/clear_refs just before each save) of DP rank 0 during a save, in GiB
  rank 0 +        that peak minus rank 0's resident size just before the save (what the save itself
                  allocates: gathered optimizer state, staging copies)
  max peak        the highest such peak over all ranks
  written         MiB of .distcp shard files each rank wrote (rank 0 / the largest of the others)

On CPU a fully_reshardable save all-gathers the optimizer state: every rank then holds ~28 bytes per
parameter more (~5.5 GiB per rank for the default model), so size the model to the machine's memory.
Timings on a shared machine are noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

# tiny.yaml's language model widened to ~200M parameters (vocabulary 32768, untied output layer)
DEFAULT_OVERRIDES = [
    "model.language.hidden_size=1024",
    "model.language.num_layers=12",
    "model.language.num_attention_heads=16",
    "model.language.num_query_groups=2",
    "model.language.ffn_hidden_size=2816",
    "model.language.vocab_size=32768",
]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/configs/tiny.yaml", help="run config YAML")
    ap.add_argument("--dp", default="2,4", help="comma-separated data-parallel sizes (processes per row)")
    ap.add_argument("--sharding", default="fully_reshardable,dp_reshardable",
                    help="comma-separated optimizer layouts to compare (checkpoint.optimizer_sharding); "
                         "empty: the config's")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=2, help="saves per row (the median time is reported)")
    ap.add_argument("--no-default-model", action="store_true",
                    help="use the config's model as it is, without the ~200M-parameter overrides")  # fmt: skip
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # result file; set by the launcher
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.language.num_layers=4")
    return ap.parse_intermixed_args(argv)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")


def _written_mib(step: str) -> dict[int, float]:
    """MiB of .distcp files by the global rank that wrote them (torch DCP names them __<rank>_<n>.distcp)."""
    out: dict[int, float] = {}
    for path in glob.glob(os.path.join(step, "*.distcp")):
        rank = int(os.path.basename(path).split("_")[2])
        out[rank] = out.get(rank, 0.0) + os.path.getsize(path) / 2**20
    return out


def worker(args) -> None:
    import gc

    import torch.distributed as dist

    from megasail.checkpoint import read_meta, save_checkpoint, step_dir
    from megasail.checkpoint.compat import materialize_adam_state
    from megasail.config import load_config
    from megasail.data.loader.config import StageConfig
    from megasail.runtime import destroy, init_process_group, initialize
    from megasail.training import build_model_chunks, wrap_ddp
    from megasail.training.optim import build_optimizer

    cfg = load_config(args.config, args.overrides)
    init_process_group(cfg.train.timeout_minutes)
    p = cfg.parallel
    initialize(p.tensor, p.pipeline, p.virtual_pipeline, p.context, seed=cfg.seed)
    chunks = build_model_chunks(cfg.model, p)
    model = wrap_ddp(chunks, p)
    optimizer = build_optimizer(cfg, model, StageConfig(name="bench", trainable=["vision", "projector", "language"]))
    materialize_adam_state(optimizer)  # Adam's moments exist from the first step on: a save holds them
    params = sum(x.numel() for c in chunks for x in c.parameters())
    root = os.path.join(os.path.dirname(args.worker), "ckpt")
    times, peaks, grown, written, sharding = [], [], [], {}, None
    for i in range(1, args.repeats + 1):
        gc.collect()
        dist.barrier()
        _reset_peak_rss()
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        save_checkpoint(
            root, i, model, optimizer, None, meta={"bench": True}, keep_last=1,
            optimizer_sharding=cfg.checkpoint.optimizer_sharding,
        )  # fmt: skip
        dist.barrier()
        times.append(time.perf_counter() - start)
        peak = _status_kib("VmHWM")
        peaks.append(peak / 2**20)
        grown.append((peak - before) / 2**20)
        if dist.get_rank() == 0:
            written = _written_mib(step_dir(root, i))
            sharding = read_meta(step_dir(root, i))["optimizer_sharding"]  # what the save wrote
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, {"times": times, "peak": max(peaks), "grown": max(grown)})
    if dist.get_rank() == 0:
        others = [written.get(r, 0.0) for r in range(1, dist.get_world_size())]
        result = {
            "sharding": sharding,
            "dp": dist.get_world_size(),
            "params": params,  # whole on every rank at TP=PP=1
            "save_s": statistics.median(max(r["times"][i] for r in rows) for i in range(args.repeats)),
            "rank0_peak_gib": rows[0]["peak"],
            "rank0_grown_gib": rows[0]["grown"],
            "max_peak_gib": max(r["peak"] for r in rows),
            "written_rank0_mib": written.get(0, 0.0),
            "written_other_mib": max(others) if others else 0.0,
        }
        with open(args.worker, "w") as f:
            json.dump(result, f)
    destroy()


# ---------------------------------------------------------------- launcher
def format_table(rows: list[dict]) -> str:
    lines = [
        "| optimizer sharding | DP | params | save s | rank 0 peak GiB | rank 0 + GiB | max peak GiB | "
        "written MiB (rank 0 / other) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sharding']} | {r['dp']} | {r['params'] / 1e6:.0f}M | {r['save_s']:.2f} | "
            f"{r['rank0_peak_gib']:.2f} | {r['rank0_grown_gib']:.2f} | {r['max_peak_gib']:.2f} | "
            f"{r['written_rank0_mib']:.0f} / {r['written_other_mib']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return []
    base = ([] if args.no_default_model else DEFAULT_OVERRIDES) + args.overrides + ["logging.wandb=false"]
    shardings = [s.strip() for s in args.sharding.split(",")] if args.sharding else [None]
    rows = []
    for dp in [int(x) for x in args.dp.split(",") if x.strip()]:
        for sharding in shardings:
            with tempfile.TemporaryDirectory(prefix="bench_save_") as tmp:
                result = os.path.join(tmp, "result.json")
                overrides = base + ([f"checkpoint.optimizer_sharding={sharding}"] if sharding else [])
                cmd = [
                    sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(dp),
                    os.path.abspath(__file__), "--worker", result, "--config", args.config,
                    "--repeats", str(args.repeats), *overrides,
                ]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                done = subprocess.run(cmd, env=env, cwd=REPO)
                if done.returncode != 0:
                    raise SystemExit(f"bench_save: the DP={dp} run failed (exit {done.returncode})")
                with open(result) as f:
                    rows.append(json.load(f))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
