"""Parameter counts per component and memory per pipeline stage, without allocating weights.

    python tools/model_summary.py --config examples/configs/sail_vl_2b.yaml parallel.tensor=2 parallel.pipeline=2
    python tools/model_summary.py --config sail_vl_8b --json          # a preset name works too

The model is built once at TP=1/PP=1 on the meta device; each parameter is then placed on its
pipeline stage(s) and divided by TP when megatron shards it. Memory counts weights, gradients
(fp32 main grads, as megatron DDP keeps them) and Adam state (fp32 master copy when training in
bf16/fp16, plus two moments; divided over data-parallel ranks with the distributed optimizer).
Activations are not included. It also prints forward TFLOPs per sequence and the stage-0 LLM
layer count that balances the ViT against the other stages (for ``parallel.first_stage_llm_layers``),
for the ``--seq-length`` and ``--tiles-per-sequence`` given. With ``--json`` the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from megasail.config import RunConfig, load_config  # noqa: E402
from megasail.models.presets import PRESETS  # noqa: E402

_GIB = 2**30
_WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")


def load_run_config(config: str, overrides: list[str]) -> RunConfig:
    """A YAML path, or a preset name from ``megasail.models.presets``, plus dotted overrides."""
    if config in PRESETS:
        return load_config(None, overrides, schema=lambda: RunConfig(model=PRESETS[config]()))
    return load_config(config, overrides)


def stage_layers(run: RunConfig) -> list[list[int]]:
    """Global LLM layer indices held by each pipeline rank (all its virtual chunks)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megasail.models.mcore_config import language_transformer_config

    config = language_transformer_config(run.model, run.parallel)
    stages = []
    for pp_rank in range(run.parallel.pipeline):
        layers = []
        for vp_stage in range(run.parallel.virtual_pipeline or 1):
            vp = vp_stage if run.parallel.virtual_pipeline else None
            offset = get_transformer_layer_offset(config, vp, pp_rank)
            layers += list(range(offset, offset + get_num_layers_to_build(config, vp, pp_rank)))
        stages.append(layers)
    return stages


def summarize(run: RunConfig, data_parallel: int = 1, seq_length: int = 8192, tiles_per_sequence: float = 10) -> dict:
    from megasail import runtime
    from megasail.models import flops
    from megasail.models.sail_vl import SailVLModel

    runtime.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    with torch.device("meta"):
        model = SailVLModel(run.model)
    parts = {"vision": model.vision_model, "projector": model.projector, "language": model.language_model}
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["total"] = sum(counts.values())

    tp, pp = run.parallel.tensor, run.parallel.pipeline
    layers_of = stage_layers(run)
    stage_params = [0.0] * pp
    for name, param in model.named_parameters():
        local = param.numel() / tp if getattr(param, "tensor_model_parallel", False) else param.numel()
        m = _LAYER.match(name)
        if m:
            holders = [s for s in range(pp) if int(m[1]) in layers_of[s]]
        elif name.startswith(("language_model.decoder.final_layernorm.", "language_model.output_layer.")):
            holders = [pp - 1]
        else:  # vision tower, projector, embedding
            holders = [0]
            if name.startswith("language_model.embedding.") and not run.model.language.untie_embeddings_and_output_weights:
                holders = sorted({0, pp - 1})  # tied output layer keeps a copy on the last stage
        for s in holders:
            stage_params[s] += local

    precision = run.model.precision
    optimizer_bytes = 8 + (4 if precision != "fp32" else 0)
    dp_shards = data_parallel if run.parallel.distributed_optimizer else 1
    stages = []
    for s, n in enumerate(stage_params):
        weights, grads = n * _WEIGHT_BYTES[precision] / _GIB, n * 4 / _GIB
        optim = n * optimizer_bytes / dp_shards / _GIB
        stages.append({"pp_rank": s, "llm_layers": len(layers_of[s]), "params": int(n),
                       "weights_gib": round(weights, 3), "grads_gib": round(grads, 3),
                       "optimizer_gib": round(optim, 3), "total_gib": round(weights + grads + optim, 3)})
    tiles = int(tiles_per_sequence)
    return {**counts, "tokens_per_tile": run.model.tokens_per_tile, "precision": precision,
            "tensor": tp, "pipeline": pp, "data_parallel": data_parallel, "stages": stages,
            "seq_length": seq_length, "tiles_per_sequence": tiles_per_sequence,
            "forward_tflops_per_sequence": round(flops.sequence_flops(run.model, seq_length, tiles) / 1e12, 3),
            "vision_share_of_flops": round(tiles * flops.vision_flops_per_tile(run.model)
                                           / flops.sequence_flops(run.model, seq_length, tiles), 4),
            "suggested_first_stage_llm_layers": flops.suggest_first_stage_layers(
                run.model, pp, seq_length, tiles_per_sequence, run.parallel.virtual_pipeline)}


def _print_table(summary: dict) -> None:
    print(f"{'component':<12}{'parameters':>16}")
    for name in ("vision", "projector", "language", "total"):
        print(f"{name:<12}{summary[name]:>16,}")
    print(f"\nper rank (TP={summary['tensor']}, PP={summary['pipeline']}, DP={summary['data_parallel']}, "
          f"{summary['precision']}; activations not included)")
    print(f"{'stage':<7}{'LLM layers':>11}{'params':>16}{'weights GiB':>13}{'grads GiB':>11}{'Adam GiB':>10}{'total GiB':>11}")
    for st in summary["stages"]:
        print(f"{st['pp_rank']:<7}{st['llm_layers']:>11}{st['params']:>16,}{st['weights_gib']:>13.2f}"
              f"{st['grads_gib']:>11.2f}{st['optimizer_gib']:>10.2f}{st['total_gib']:>11.2f}")
    print(f"\nforward {summary['forward_tflops_per_sequence']} TFLOP per {summary['seq_length']}-token sequence "
          f"with {summary['tiles_per_sequence']} tiles (ViT + projector {100 * summary['vision_share_of_flops']:.1f}%)")
    if summary["suggested_first_stage_llm_layers"] is not None:
        print(f"balanced split: parallel.first_stage_llm_layers={summary['suggested_first_stage_llm_layers']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help=f"YAML config path or preset name ({', '.join(PRESETS)})")
    parser.add_argument("--data-parallel", type=int, default=1, help="data-parallel size for the optimizer-state shard")
    parser.add_argument("--seq-length", type=int, default=8192, help="packed sequence length for FLOPs and the split")
    parser.add_argument("--tiles-per-sequence", type=float, default=10, help="average image tiles per sequence")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor=2")
    args = parser.parse_args(argv)
    summary = summarize(load_run_config(args.config, args.overrides), args.data_parallel, args.seq_length,
                        args.tiles_per_sequence)
    _print_table(summary)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
