"""Forward+backward time of SailVLModel against a plain megatron-core GPTModel on the same tokens.

Rows (measured side by side in one process, medians of --repeats):
  gpt            megatron GPTModel with the config's LLM, text tokens
  sailvl_text    SailVLModel on the same text-only batch (wrapper overhead: embedding path, zero-weighted vision touch)
  vision         ViT + projector alone on the batch's tiles
  sailvl_images  SailVLModel with images spliced at <IMG_CONTEXT> (overhead = this - gpt - vision)

On CUDA it also reports tokens/s, TFLOP/s and MFU, and with Transformer Engine an FP8 row. FLOPs follow
the training loop's convention (megasail.models.flops: real tokens, causal attention per sample, every part
trained: 3x forward), against the peak of this GPU by name (FP8 parts against the FP8 peak). On CPU it runs
the tiny config and reports the ratios only.

    python tools/bench_model.py --config examples/configs/tiny.yaml
    python tools/bench_model.py --config examples/configs/sail_vl_2b.yaml --seq-length 8192 --tiles 10   # one GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="examples/configs/tiny.yaml", help="model config YAML")
    ap.add_argument("--seq-length", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--tiles", type=int, default=2, help="image tiles per sequence (448px -> 256 tokens each)")
    ap.add_argument("--repeats", type=int, default=5, help="timed iterations per row (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations per row")
    ap.add_argument("--fp8", action="store_true", help="add an FP8 row (needs CUDA and Transformer Engine)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.language.num_layers=2")
    return ap.parse_intermixed_args(argv)


def _time_round_robin(runs: dict, repeats: int, warmup: int) -> dict:
    """Median seconds per named callable; the rows take turns each repeat so load drift hits all alike."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _fwd_bwd(model, batch):
    def run():
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.float().mean().backward()

    return run


def count_flops(model_cfg, batch: dict, trainable=("vision", "projector", "language")):
    """The training loop's count (megasail.models.flops.FlopsModel.batch_flops) of one micro-batch: a
    packed batch by its cu_seqlens / num_samples, a synthetic one (neither) as one sample per row."""
    import torch

    from megasail.models.flops import FlopsModel

    if batch.get("cu_seqlens") is None:
        rows, s = batch["input_ids"].shape
        batch = {**batch, "cu_seqlens": torch.arange(0, (rows + 1) * s, s), "num_samples": torch.ones(rows)}
    return FlopsModel.from_config(model_cfg).batch_flops(batch, list(trainable))


def build(cfg_model, device, dtype):
    from megatron.core.models.gpt import GPTModel

    from megasail.models import specs
    from megasail.models.mcore_config import language_transformer_config
    from megasail.models.sail_vl import SailVLModel

    vlm = SailVLModel(cfg_model).to(device=device, dtype=dtype)
    lm_cfg = language_transformer_config(cfg_model)
    lm = cfg_model.language
    gpt = GPTModel(
        config=lm_cfg,
        transformer_layer_spec=specs.language_block_spec(lm_cfg, specs.use_transformer_engine(cfg_model.transformer_impl),
                                                         False),
        vocab_size=lm.vocab_size, max_sequence_length=lm.max_position_embeddings, parallel_output=True,
        share_embeddings_and_output_weights=not lm.untie_embeddings_and_output_weights,
        position_embedding_type="rope", rotary_base=lm.rotary_base,
    ).to(device=device, dtype=dtype)
    return vlm, gpt


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from megasail.config import load_config
    from megasail.models.flops import FlopsModel, run_peak, step_metrics
    from megasail.models.synthetic import synthetic_batch
    from megasail.runtime import destroy, initialize

    cfg = load_config(args.config, args.overrides)
    initialize(1, 1, seed=cfg.seed)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    from megasail.models.mcore_config import PRECISION_DTYPES

    dtype = PRECISION_DTYPES[cfg.model.precision]
    vlm, gpt = build(cfg.model, device, dtype)

    b, s, tiles = args.micro_batch, args.seq_length, args.tiles
    img = synthetic_batch(cfg.model, s, [tiles] * b, seed=0, dtype=dtype)
    txt = synthetic_batch(cfg.model, s, [0] * b, seed=1, dtype=dtype)

    def as_inputs(batch, with_pixels=True):
        out = {"input_ids": batch["input_ids"].to(device), "position_ids": batch["position_ids"].to(device),
               "labels": batch["labels"].to(device)}
        if with_pixels:
            px = batch["pixel_values"]
            out["pixel_values"] = None if px is None else px.to(device)
        return out

    gpt_inputs = as_inputs(txt, with_pixels=False)
    gpt_inputs["attention_mask"] = None
    vision_run = (lambda: vlm.image_embeddings(img["pixel_values"].to(device)).float().mean().backward())

    runs = {
        "gpt": _fwd_bwd(gpt, gpt_inputs),
        "sailvl_text": _fwd_bwd(vlm, as_inputs(txt)),
        "sailvl_images": _fwd_bwd(vlm, as_inputs(img)),
    }
    if tiles:
        runs["vision"] = vision_run
    if args.fp8 and device.type == "cuda" and vlm.use_te:
        import copy

        cfg8 = copy.deepcopy(cfg.model)
        cfg8.fp8 = "hybrid"
        vlm8, _ = build(cfg8, device, dtype)
        runs["sailvl_images_fp8"] = _fwd_bwd(vlm8, as_inputs(img))
    seconds = _time_round_robin(runs, args.repeats, args.warmup)
    seconds.setdefault("vision", 0.0)
    tokens = b * s
    flops = {
        "gpt": count_flops(cfg.model, txt, ["language"]),
        "sailvl_text": count_flops(cfg.model, txt),
        "vision": FlopsModel.from_config(cfg.model).step_flops(b * tiles, [], ["vision", "projector"]),
        "sailvl_images": count_flops(cfg.model, img),
    }
    if "sailvl_images_fp8" in seconds:
        flops["sailvl_images_fp8"] = count_flops(cfg8, img)  # the LLM's linear layers against the FP8 peak
    peak = run_peak(cfg.model)
    rows = []
    for name, sec in seconds.items():
        measured = step_metrics(flops[name], sec, 1, peak) if sec else {"tflops_per_device": 0.0, "mfu": None}
        row = {"row": name, "ms": sec * 1e3, "tokens_per_s": tokens / sec if sec else 0.0,
               "tflops": measured["tflops_per_device"]}
        row["ratio_vs_gpt"] = sec / seconds["gpt"]
        if device.type == "cuda":
            row["mfu"] = measured["mfu"]
        rows.append(row)
    overhead_text = seconds["sailvl_text"] / seconds["gpt"] - 1
    overhead_images = (seconds["sailvl_images"] - seconds["gpt"] - seconds["vision"]) / seconds["gpt"]

    print(f"device={device.type} precision={cfg.model.precision} impl={'te' if vlm.use_te else 'local'} "
          f"seq_length={s} micro_batch={b} tiles/seq={tiles} ({cfg.model.tokens_per_tile} tokens/tile)")
    header = "| row | ms/step | tokens/s | TFLOP/s | time / gpt |" + (" MFU |" if device.type == "cuda" else "")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        line = f"| {r['row']} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.3f} | {r['ratio_vs_gpt']:.3f} |"
        if device.type == "cuda":
            line += f" {r['mfu']:.1%} |" if r["mfu"] is not None else " n/a |"
        print(line)
    print(f"wrapper overhead, text-only: {overhead_text:+.1%}; with images beyond GPT + ViT alone: {overhead_images:+.1%}")
    if args.fp8 and not (device.type == "cuda" and vlm.use_te):
        print("FP8 row skipped: needs CUDA and Transformer Engine", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "overhead_text": overhead_text, "overhead_images": overhead_images}, f, indent=2)
    destroy()
    return rows


if __name__ == "__main__":
    main()
