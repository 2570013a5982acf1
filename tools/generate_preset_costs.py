#!/usr/bin/env python
"""Write the loader's preset DP balancing prices (PRESET_COSTS in megasail/data/loader/balance.py) from
the one FLOPs convention, megasail.models.flops.balancing_prices of each model preset.

    python tools/generate_preset_costs.py            # rewrite the table in place
    python tools/generate_preset_costs.py --check    # exit 1 (and show both) when the table is stale

The table is written out, not imported, because the data layer imports nothing from megasail.models
(the loader can be used alone); the lines between "# BEGIN PRESET_COSTS" and "# END PRESET_COSTS" are
replaced, nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

BALANCE = os.path.join(REPO, "megasail", "data", "loader", "balance.py")
BEGIN, END = "# BEGIN PRESET_COSTS", "# END PRESET_COSTS"


def preset_table() -> str:
    """The PRESET_COSTS block (BEGIN line to END line), one entry per model preset."""
    from megasail.models.flops import balancing_prices
    from megasail.models.presets import PRESETS

    lines = [
        f"{BEGIN}: written by tools/generate_preset_costs.py from megasail.models.flops",
        "# (a test fails when they differ; do not edit by hand), so that the data layer imports nothing from",
        "# megasail.models: per token slot, per squared sample length (l^2 / 2 causal pairs), per 448px tile",
        "PRESET_COSTS = {",
    ]
    for name in sorted(PRESETS):
        prices = balancing_prices(PRESETS[name]())
        args = ", ".join(f"{k}={float(v)!r}" for k, v in prices.items())
        line = f'    "{name}": SequenceCostModel({args}),'
        if len(line) > 110:  # the project's line length
            line = f'    "{name}": SequenceCostModel(\n        {args}\n    ),'
        lines.append(line)
    lines += ["}", END]
    return "\n".join(lines) + "\n"


def split(text: str, path: str) -> tuple[str, str, str]:
    """(before, table block, after) of balance.py's text."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: no '{BEGIN}' ... '{END}' block to replace")
    end = text.index("\n", end) + 1
    return text[:start], text[start:end], text[end:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when the table is stale")
    ap.add_argument("--path", default=BALANCE, help="balance.py to read and write (default: this checkout's)")
    args = ap.parse_args(argv)
    with open(args.path, encoding="utf-8") as f:
        text = f.read()
    before, current, after = split(text, args.path)
    wanted = preset_table()
    if current == wanted:
        print(f"{args.path}: PRESET_COSTS is up to date")
        return 0
    if args.check:
        print(
            f"{args.path}: PRESET_COSTS differs from megasail.models.flops; run tools/generate_preset_costs.py\n"
            f"--- in the file ---\n{current}--- from megasail.models.flops ---\n{wanted}",
            file=sys.stderr,
        )
        return 1
    with open(args.path, "w", encoding="utf-8") as f:
        f.write(before + wanted + after)
    print(f"{args.path}: PRESET_COSTS rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
