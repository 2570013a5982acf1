"""Parameter counts per component and memory per pipeline stage, without allocating weights.

    python tools/model_summary.py --config examples/configs/sail_vl_2b.yaml parallel.tensor=2 parallel.pipeline=2
    python tools/model_summary.py --config sail_vl_8b --json          # a preset name works too

The model is built once at TP=1/PP=1 on the meta device; each parameter is then placed on its
pipeline stage(s) and divided by TP when megatron shards it (the ``params`` column). Memory per GPU of
one rank of each pipeline stage comes from ``megasail.models.memory``, the model the plan and the
start-up check use: weights, fp32 gradient buffer and Adam state of the ``--trainable`` parts
(divided over ``--data-parallel`` ranks with the distributed optimizer), activations of the
micro-batches the 1F1B schedule holds at ``data.micro_batch_size`` x ``--seq-length`` tokens with
``--tiles-per-sequence`` tiles and ``train.recompute``, logits, inputs and the backward working set.
It also prints forward TFLOPs per sequence and the stage-0 LLM layer count that balances the ViT
against the other stages (for ``parallel.first_stage_llm_layers``). With ``--json`` the last line is
one JSON object.
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
from megasail.models import memory  # noqa: E402
from megasail.models.presets import PRESETS  # noqa: E402

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


def summarize(run: RunConfig, data_parallel: int = 1, seq_length: int = 8192,
              tiles_per_sequence: float = 10, trainable: tuple[str, ...] = memory.PARTS,
              attention: str | None = None) -> dict:
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

    run.data.seq_length = seq_length
    flash = attention == "flash" if attention else run.model.transformer_impl != "local"
    layout = memory.MemoryLayout.from_run(run, data_parallel, tiles_per_sequence, flash_attention=flash)
    estimates = memory.stage_memory(run.model, layout, list(trainable))
    stages = []
    for s, (n, estimate) in enumerate(zip(stage_params, estimates, strict=True)):
        gib = estimate.gib()
        stages.append({"pp_rank": s, "llm_layers": len(layers_of[s]), "params": int(n),
                       "params_estimated": gib.pop("params"), **gib})
    tiles = int(tiles_per_sequence)
    return {**counts, "tokens_per_tile": run.model.tokens_per_tile, "precision": run.model.precision,
            "tensor": tp, "pipeline": pp, "data_parallel": data_parallel, "trainable": list(trainable),
            "recompute": run.train.recompute, "attention": "flash" if flash else "unfused",
            "micro_batch_size": run.data.micro_batch_size, "stages": stages,
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
    print(f"\nper rank in GiB (TP={summary['tensor']}, PP={summary['pipeline']}, "
          f"DP={summary['data_parallel']}, {summary['precision']}; trains {'+'.join(summary['trainable'])}; "
          f"{summary['micro_batch_size']} x "
          f"{summary['seq_length']} tokens and {summary['tiles_per_sequence']:g} tiles per micro-batch, "
          f"recompute={summary['recompute']}, {summary['attention']} attention)")
    columns = [("weights", "weights_gib"), ("grads", "grads_gib"), ("Adam", "optimizer_gib"),
               ("activations", "activations_gib"), ("logits", "logits_gib"), ("inputs", "inputs_gib"),
               ("backward", "transient_gib"), ("total", "total_gib")]
    print(f"{'stage':<7}{'LLM layers':>11}{'params':>16}" + "".join(f"{c:>13}" for c, _ in columns))
    for st in summary["stages"]:
        print(f"{st['pp_rank']:<7}{st['llm_layers']:>11}{st['params']:>16,}"
              + "".join(f"{st[k]:>13.2f}" for _, k in columns))
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
    parser.add_argument("--trainable", default=",".join(memory.PARTS),
                        help="parts that train (comma-separated: vision, projector, language); frozen "
                             "ones hold no gradients or optimizer state")
    parser.add_argument("--attention", choices=("flash", "unfused"), default=None,
                        help="core attention of the activation estimate (default: flash unless "
                             "model.transformer_impl=local)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor=2")
    args = parser.parse_args(argv)
    trainable = tuple(x for x in args.trainable.split(",") if x)
    unknown = set(trainable) - set(memory.PARTS)
    if unknown:
        parser.error(f"--trainable: unknown parts {sorted(unknown)}; choose from {list(memory.PARTS)}")
    summary = summarize(load_run_config(args.config, args.overrides), args.data_parallel, args.seq_length,
                        args.tiles_per_sequence, trainable, args.attention)
    _print_table(summary)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
