#!/usr/bin/env python
"""Convert between HuggingFace InternVL / SAIL-VL directories and megasail checkpoints.

    # released weights -> a megasail checkpoint (weights only, iteration 0) + its config YAML
    python tools/convert_checkpoint.py --from hf --to megasail --input SAIL-VL-2B/ --output ckpt/sail_vl_2b
    # a training checkpoint (any TP/PP/DP it was saved at) -> transformers' layout
    python tools/convert_checkpoint.py --from megasail --to hf --input runs/sft/ckpt --output export/
    # remote-code (InternVL-chat) layout instead, or re-layout a HF directory
    python tools/convert_checkpoint.py --from megasail --to hf --layout remote-code --input ... --output ...
    python tools/convert_checkpoint.py --from hf --to hf --input SAIL-VL-2B/ --output sail_vl_2b_hf/

One CPU process, no launcher, tensor by tensor: memory stays near one tensor (plus the largest
shard at most). HF input: config.json + safetensors (sharded with model.safetensors.index.json, or
not), transformers' or the remote-code key layout; pickled .bin weights only with --allow-pickle;
no remote code is ever imported. The megasail checkpoint is torch_dist (megatron-core
dist_checkpointing): it loads at any TP/PP/DP (``checkpoint.load=DIR checkpoint.weights_only=true``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megasail.models.config import PRECISIONS  # noqa: E402  (plain dataclasses: --help stays fast)

log = logging.getLogger("convert")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    unit = {
        "": 1,
        "B": 1,
        "K": 1 << 10,
        "KB": 1 << 10,
        "M": 1 << 20,
        "MB": 1 << 20,
        "G": 1 << 30,
        "GB": 1 << 30,
    }
    return int(float(m[1]) * unit[m[2]])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=("hf", "megasail"), help="input format")
    p.add_argument("--to", dest="target", required=True, choices=("hf", "megasail"), help="output format")
    p.add_argument("--input", required=True, help="HF directory, or megasail checkpoint root / iter_* dir")
    p.add_argument("--output", required=True, help="directory to create (must not hold a checkpoint yet)")
    p.add_argument(
        "--layout",
        default="transformers",
        choices=("transformers", "remote-code"),
        help="HF key layout written with --to hf (transformers loads 'transformers' without remote code)",
    )
    p.add_argument("--precision", choices=PRECISIONS, help="dtype written (default: the input's)")
    p.add_argument(
        "--tokenizer",
        help="tokenizer.json, sentencepiece .model or their directory, written into a HF export as "
        "tokenizer.json + tokenizer_config.json + chat template + image processor config (default: the "
        "checkpoint's dataset tokenizer, or the input HF directory's)",
    )
    p.add_argument(
        "--max-shard-size", type=parse_size, default=parse_size("5GB"), help="HF shard size (e.g. 2GB)"
    )
    p.add_argument(
        "--allow-pickle", action="store_true", help="read pickled *.bin weights (unpickling can run code)"
    )
    p.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        help="layout the checkpoint is meant for: checked against the model (torch_dist reshards on load)",
    )
    p.add_argument("--pipeline-parallel", type=int, default=1, help="likewise for pipeline stages")
    return p.parse_args(argv)


def _check_layout(config, tp: int, pp: int) -> None:
    lm, vit = config.language, config.vision
    problems = [
        f"{name}={value} is not divisible by --tensor-parallel {tp}"
        for name, value in (
            ("language heads", lm.num_attention_heads),
            ("language kv groups", lm.num_query_groups),
            ("vision heads", vit.num_attention_heads),
            ("vocab_size", lm.vocab_size),
        )
        if value % tp
    ]
    if lm.num_layers % pp:
        problems.append(f"{lm.num_layers} language layers do not split into --pipeline-parallel {pp} stages")
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr)


def _run_config_yaml(config, raw: dict) -> str:
    """The run config of a converted checkpoint: its model, and the tiling its config.json names."""
    from megasail.config import RunConfig, to_yaml
    from megasail.data.loader.config import DataConfig

    data = DataConfig(
        max_tiles=raw.get("max_dynamic_patch", DataConfig.max_tiles),
        min_tiles=raw.get("min_dynamic_patch", DataConfig.min_tiles),
    )  # the tile side follows the model (RunConfig derives data.tile_size)
    return to_yaml(RunConfig(model=config, data=data))


def hf_to_megasail(args) -> None:
    from megasail.checkpoint import latest_checkpoint
    from megasail.convert.dist import checkpoint_names, meta_model, write_weights_checkpoint
    from megasail.convert.hf_dir import HFSource, read_hf_config
    from megasail.convert.recipes import recipes

    config, raw = read_hf_config(args.input, precision=args.precision, transformer_impl="local")
    _check_layout(config, args.tensor_parallel, args.pipeline_parallel)
    source = HFSource(args.input, config, args.allow_pickle)
    model = meta_model(config)
    _, shapes, _ = checkpoint_names(model)
    by_name = {r.megasail: r for r in recipes(config)}
    missing = sorted(set(shapes) - set(by_name))
    if missing:
        raise SystemExit(f"error: no HF source for megasail tensors {missing[:5]}")
    source.check_shapes(shapes)
    yaml = _run_config_yaml(config, raw)
    if os.path.isdir(args.output) and latest_checkpoint(args.output) is not None:
        raise SystemExit(f"error: {args.output} already holds a checkpoint")
    os.makedirs(args.output, exist_ok=True)
    with _bar(len(shapes) + sum(r.kind == "gate_up" for r in by_name.values()), "hf -> megasail") as bar:
        step = write_weights_checkpoint(
            args.output, model, lambda n: source.tensor(by_name[n]), config_yaml=yaml, progress=bar
        )
    tokenizer = _tokenizer_for(args)
    if tokenizer:  # chat.py and the export find it here (a converted checkpoint has no dataset manifest)
        from megasail.convert.hf_dir import copy_tokenizer

        os.makedirs(os.path.join(args.output, "tokenizer"), exist_ok=True)
        copy_tokenizer(tokenizer, os.path.join(args.output, "tokenizer"))
    with open(os.path.join(args.output, "config.yaml"), "w") as f:
        f.write(f"# derived from {os.path.abspath(args.input)}/config.json ({source.layout} layout)\n{yaml}")
    log.info(
        "wrote %s (%s weights, layout %s) and %s/config.yaml",
        step,
        config.precision,
        source.layout,
        args.output,
    )


def _tokenizer_for(args, data_tokenizer: str | None = None) -> str | None:
    """--tokenizer, else the training data's (a megasail checkpoint) or ROOT/tokenizer (a converted
    one), else the input HF directory's tokenizer.json."""
    if args.tokenizer:
        return args.tokenizer
    if args.source == "megasail":
        from megasail.inference.loading import checkpoint_tokenizer

        return data_tokenizer or checkpoint_tokenizer(args.input)
    if os.path.isfile(os.path.join(args.input, "tokenizer.json")):
        return args.input
    return None


def to_hf(args) -> None:
    from megasail.convert.hf_dir import write_hf_directory

    run_config = None
    if args.source == "megasail":
        from megasail.checkpoint import DistSource, latest_checkpoint, read_meta
        from megasail.config import load_config
        from megasail.convert.dist import checkpoint_names, meta_model

        step = latest_checkpoint(args.input)
        if step is None:
            raise SystemExit(f"error: no checkpoint under {args.input}")
        meta = read_meta(step)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(meta["config"])
            f.flush()
            run_config = load_config(f.name, ["model.transformer_impl=local"], retired="ignore")
        config = run_config.model
        if args.precision:
            config.precision = args.precision
        names, shapes, _ = checkpoint_names(meta_model(config))
        source = DistSource(step)
        lacking = sorted(k for k in names if k not in source.tensors)
        if lacking:
            raise SystemExit(f"error: {step} lacks model tensors {lacking[:5]}")
        by_name = {name: key for key, name in names.items()}

        def produce(name):
            return source.read(by_name[name])
    else:
        from megasail.convert.hf_dir import HFSource, read_hf_config
        from megasail.convert.recipes import recipes

        config, _ = read_hf_config(args.input, precision=args.precision, transformer_impl="local")
        hf = HFSource(args.input, config, args.allow_pickle)
        by_recipe = {r.megasail: r for r in recipes(config)}
        from megasail.convert.dist import checkpoint_names, meta_model

        _, shapes, _ = checkpoint_names(meta_model(config))
        hf.check_shapes(shapes)

        def produce(name):
            return hf.tensor(by_recipe[name])

    from megasail.models.mcore_config import PRECISION_DTYPES

    dtype = PRECISION_DTYPES[config.precision]
    from megasail.data.text.tokenizer import MultimodalTokenizer
    from megasail.inference.loading import data_settings, hf_prompt_settings

    data_tokenizer = None
    if run_config is not None:  # the template and tiling the checkpoint's data was prepared with
        data_tokenizer, prompt = data_settings(run_config, meta.get("stage", {}).get("index"))
    else:
        prompt = hf_prompt_settings(args.input, config)
    tokenizer_path = _tokenizer_for(args, data_tokenizer)
    tokenizer = MultimodalTokenizer.load(tokenizer_path) if tokenizer_path else None
    from megasail.convert.recipes import hf_file_plan

    total = len(hf_file_plan(config, shapes, args.layout))
    with _bar(total, f"-> hf ({args.layout})") as bar:
        files = write_hf_directory(
            args.output,
            config,
            shapes,
            produce,
            dtype=dtype,
            layout=args.layout,
            max_shard_bytes=args.max_shard_size,
            tokenizer=tokenizer,
            prompt=prompt,
            progress=bar,
        )
    if tokenizer is None:
        log.warning(
            "no tokenizer or processor written: pass --tokenizer (the run's dataset manifest names none)"
        )
    log.info(
        "wrote %d safetensors file(s), config.json, generation_config.json%s to %s (template %s, %d-%d tiles)",
        len(files),
        ", tokenizer and processor files" if tokenizer is not None else "",
        args.output,
        prompt.template,
        prompt.min_tiles,
        prompt.max_tiles,
    )


def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB. VmHWM starts afresh at exec, unlike
    getrusage's ru_maxrss, which keeps the peak of the process this one was forked from."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.source == "megasail" and args.target == "megasail":
        raise SystemExit(
            "error: --from megasail --to megasail: a torch_dist checkpoint already loads at any layout"
        )
    from megasail.convert.hf_dir import MissingConfigError, require_hf_directory

    if args.source == "hf":
        try:
            require_hf_directory(args.input)
        except MissingConfigError as e:  # the user's directory, not a bug: one line, no traceback
            raise SystemExit(f"error: {e}") from None
    from megasail import runtime

    runtime.initialize(1, 1)  # one process: sharded state dicts read megatron's parallel state
    import transformers.models.internvl.configuration_internvl  # noqa: F401  (code, before the baseline)

    import megasail.checkpoint.tensors  # noqa: F401
    import megasail.convert.dist  # noqa: F401
    import megasail.inference.loading  # noqa: F401

    start_mb = _status_mb("VmRSS")
    try:
        if args.target == "megasail":
            hf_to_megasail(args)
        else:
            to_hf(args)
    finally:
        runtime.destroy()
    peak_mb = _status_mb("VmHWM")
    log.info(
        "peak RSS %.0f MB: %.0f MB above the %.0f MB held before the first tensor (libraries)",
        peak_mb,
        peak_mb - start_mb,
        start_mb,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
