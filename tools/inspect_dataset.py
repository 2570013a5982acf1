#!/usr/bin/env python
"""Inspect an indexed multimodal dataset prefix: counts, token/image statistics, a sample rendered.

python tools/inspect_dataset.py out/sft_00                    # summary
python tools/inspect_dataset.py out/sft_00 --sample 17        # sample 17, loss spans in [[...]]
python tools/inspect_dataset.py out/sft_00 --sample 17 --dump-images /tmp/s17
python tools/inspect_dataset.py out/sft_00 --json             # machine-readable summary
"""

from __future__ import annotations

import argparse
import json
import sys

from megasail.data.format.inspect import (
    dataset_summary,
    dump_images,
    format_summary,
    render_sample,
)
from megasail.data.format.reader import IncompleteDatasetError, IndexedMultimodalDataset
from megasail.data.images.tiling import DEFAULT_MAX_TILES
from megasail.data.text.tokenizer import MultimodalTokenizer, TokenizerError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inspect_dataset.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]),
    )
    p.add_argument("prefix", help="dataset prefix (PREFIX.bin, .idx, .img.bin, .img.idx, .manifest.json)")
    p.add_argument(
        "--max-tiles",
        type=int,
        default=None,
        help=f"tile budget for token counts (default: the manifest's max_tiles, else {DEFAULT_MAX_TILES})",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=None,
        metavar="N",
        help="print sample N through its tokenizer; target (loss) spans marked [[...]] or green on a TTY",
    )
    p.add_argument(
        "--dump-images", default=None, metavar="DIR", help="with --sample: write that sample's images to DIR"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer to decode with (default: the one recorded in the manifest; token ids if unavailable)",
    )
    p.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="ANSI colour for target spans (auto: when stdout is a TTY)",
    )
    p.add_argument("--json", action="store_true", help="print the summary (and sample) as JSON")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="open a prefix without a manifest (an unfinished run or a shard)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ds = IndexedMultimodalDataset(args.prefix, allow_missing_manifest=args.allow_incomplete)
    except IncompleteDatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    max_tiles = args.max_tiles or (ds.manifest or {}).get("max_tiles", DEFAULT_MAX_TILES)
    result: dict = {"summary": dataset_summary(ds, max_tiles)}
    if args.sample is not None:
        if not -len(ds) <= args.sample < len(ds):
            print(f"error: --sample {args.sample}: the dataset has {len(ds)} samples", file=sys.stderr)
            return 2
        tok_path = args.tokenizer or (ds.manifest or {}).get("tokenizer", {}).get("path")
        tokenizer = None
        if tok_path:
            try:
                tokenizer = MultimodalTokenizer.load(tok_path)
            except TokenizerError as e:
                print(f"warning: {e}; printing token ids", file=sys.stderr)
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not args.json)
        result["sample"] = {
            "index": args.sample,
            "source": int(ds[args.sample].source),
            "text": render_sample(ds, args.sample, max_tiles, tokenizer, color),
        }
        if args.dump_images:
            result["sample"]["images"] = dump_images(ds, args.sample, args.dump_images)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    print(format_summary(result["summary"]))
    if "sample" in result:
        s = result["sample"]
        print(f"\nsample {s['index']} (source {s['source']}):\n{s['text']}")
        for path in s.get("images", []):
            print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
