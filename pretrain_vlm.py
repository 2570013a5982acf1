#!/usr/bin/env python
"""Train a SAIL-VL model: every curriculum stage of a run, resumable, on one CPU or many GPUs.

    torchrun --nproc-per-node 8 pretrain_vlm.py --config examples/configs/sail_vl_2b.yaml \\
        --stage examples/configs/stages/pretrain_alignment.yaml --stage examples/configs/stages/pretrain_advance.yaml \\
        checkpoint.save=ckpt/run1 checkpoint.load=ckpt/run1
    python pretrain_vlm.py --config examples/configs/tiny.yaml data.path=data/synth/train train.iters=50

Overrides are dotted keys (key=value); the common ones: train.iters, data.path, parallel.tensor,
parallel.pipeline, checkpoint.save, checkpoint.load, checkpoint.interval, logging.dir,
logging.wandb. --help-config lists every key with its doc and default.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (key=default, then its doc):\n" + _help_text(),
    )
    ap.add_argument("--config", help="YAML run config (examples/configs/*.yaml)")
    ap.add_argument(
        "--stage",
        action="append",
        default=[],
        metavar="FILE",
        help="a curriculum stage YAML (examples/configs/stages/*.yaml); repeat in training order; "
        "replaces data.stages",
    )
    ap.add_argument("--help-config", action="store_true", help="print only the config keys and exit")
    ap.add_argument(
        "overrides", nargs="*", help="dotted config overrides, e.g. train.iters=100 parallel.tensor=2"
    )
    args = ap.parse_intermixed_args(argv)
    if args.help_config:
        print(_help_text())
        sys.exit(0)
    return args


def _help_text() -> str:
    from megasail.config import config_help

    return config_help()


def main(argv=None) -> int:
    args = parse_args(argv)
    from megasail.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.stage:
            from megasail.data.loader.config import load_stages

            cfg.data.stages = load_stages(args.stage)
    except (ConfigError, ValueError, OSError) as e:
        print(f"pretrain_vlm.py: {e}", file=sys.stderr)
        return 2
    from megasail.runtime import destroy
    from megasail.runtime.logs import setup_logging

    setup_logging()
    from megasail.training.checkpoint import CheckpointError
    from megasail.training.checks import StartupError
    from megasail.training.loop import TrainingDiverged, pretrain

    rank0 = int(os.environ.get("RANK", "0")) == 0

    def refuse(e: Exception, code: int) -> int:
        # every rank refuses alike: one message (torchrun still reports exit 1 for the failed ranks)
        if rank0:
            print(f"pretrain_vlm.py: {e}", file=sys.stderr)
        return code

    try:
        summary = pretrain(cfg)
    except (StartupError, CheckpointError) as e:
        return refuse(e, 2)
    except TrainingDiverged as e:
        return refuse(e, 3)
    finally:
        destroy()
    if not rank0:
        return 0
    print(
        f"[megasail] done: step {summary['step']}, stage '{summary['stage']}', "
        f"last loss {summary['losses'][-1] if summary['losses'] else float('nan'):.4f}, "
        f"checkpoint {summary['checkpoint']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's workers re-import this module
    sys.exit(main())
