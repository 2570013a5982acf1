"""Command line of tools/preprocess_data.py, generated from PreprocessConfig's field docs."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from megasail.data.preprocess.config import CHOICES, PreprocessConfig
from megasail.data.preprocess.pool import WorkerDied
from megasail.data.preprocess.rejects import REJECT_REASONS
from megasail.data.preprocess.run import (
    InternalErrors,
    NoSamplesKept,
    PreprocessError,
    run_preprocess,
)
from megasail.data.text.template import TEMPLATES

EPILOG = (
    """\
input records (JSON Lines, one object per line; kinds detected per record):
  conversation  {"id": ..., "image": "a.jpg" | ["a.jpg", ...], "conversations":
                 [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}
  caption       {"image": "a.jpg", "caption": "..."}  or  {"image": ..., "text": ...}
  text          {"text": "..."}
  webdataset    .tar shards of key.jpg|png|webp + key.txt|json (img2dataset layout), streamed

exit status: 0 when the run finished with at least one sample (rejected records are reported,
               not fatal);
             2 when a check before any work failed (nothing was written);
             3 when a worker process died (killed, out of memory): rerun with --resume;
             4 when megasail raised on more records than --max-internal-errors (a bug, not bad
               input; tracebacks in PREFIX.internal_errors.jsonl, no manifest written);
             5 when the run finished but kept no sample (every record rejected, or no record read):
               the top reject reasons are printed; the prefix is written with 0 samples and its
               manifest, and training refuses it.
reject reasons: """
    + ", ".join(REJECT_REASONS)
    + """

example:
  python tools/preprocess_data.py --input 'data/sft/*.jsonl' --image-root data/images \\
      --tokenizer ckpt/SAIL-VL-2B --template sailvl-chat --output-prefix out/sft_00 --workers 8
"""
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Convert conversation / caption / text JSONL and webdataset tars into an indexed "
        "multimodal dataset prefix (tokens, images, manifest, rejects).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for f in fields(PreprocessConfig):
        flag = "--input" if f.name == "inputs" else "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if f.name == "inputs":
            parser.add_argument(
                flag,
                dest="inputs",
                action="append",
                required=True,
                metavar="PATH_OR_GLOB",
                help=help_text + " (repeat the flag)",
            )
        elif f.type == "bool":
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=f.default, help=help_text)
        else:
            default = f.default if f.default is not MISSING else None
            kind = int if f.type == "int" else str
            choices = CHOICES.get(f.name) or (
                tuple(TEMPLATES) if f.name in ("template", "caption_template") else None
            )
            required = f.name in ("output_prefix", "tokenizer")
            parser.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=default,
                choices=choices,
                required=required,
                help=help_text + ("" if required or default is None else " (default: %(default)s)"),
            )
    parser.add_argument(
        "--report-json",
        default=None,
        metavar="PATH",
        help="also write the run's summary (manifest counts and timings) to this JSON file",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report_json = args.__dict__.pop("report_json")
    cfg = PreprocessConfig(**vars(args))
    try:
        result = run_preprocess(cfg)
    except NoSamplesKept as e:
        _print_report(cfg, e.result, report_json)
        print(f"error: {e}", file=sys.stderr)
        return 5
    except PreprocessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerDied as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except InternalErrors as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished units are kept in {cfg.output_prefix}.parts/ and the prefix has no "
            "manifest; rerun with --resume to finish",
            file=sys.stderr,
        )
        return 130
    _print_report(cfg, result, report_json)
    return 0


def _print_report(cfg: PreprocessConfig, result: dict, report_json: str | None) -> None:
    m, rt = result["manifest"], result["runtime"]
    c = m["counts"]
    print(
        f"{cfg.output_prefix}: {c['written']} samples, {m['num_images']} images, "
        f"{m['tokens']['total_at_max_tiles']} tokens at max_tiles={m['max_tiles']}; "
        f"read {c['read']}, rejected {c['rejected']}, truncated {c['truncated']}; "
        f"{rt['units_run']} units run, {rt['units_resumed']} resumed, {rt['seconds']:.1f}s"
    )
    for reason, n in m["rejected_by_reason"].items():
        print(f"  rejected {n:>8} {reason}: {REJECT_REASONS[reason]}")
    if c["rejected"]:
        print(f"  details: {cfg.output_prefix}.rejects.jsonl")
    if c["internal_errors"]:
        print(
            f"  {c['internal_errors']} record(s) hit an internal error (tolerated by --max-internal-errors); "
            f"tracebacks: {cfg.output_prefix}.internal_errors.jsonl",
            file=sys.stderr,
        )
    if report_json:
        with open(report_json, "w", encoding="utf-8") as f:
            json.dump(
                {"counts": c, "rejected_by_reason": m["rejected_by_reason"], "runtime": rt}, f, indent=2
            )
