#!/usr/bin/env python
"""Probe candidate SFT sources, SAIL-VL style: short runs from one checkpoint, judged on benchmarks.

    python tools/probe_sources.py --base-config CONFIG --init CKPT --candidates sources.yaml \\
        --benchmark bench/textvqa.jsonl --benchmark bench/pope.jsonl --budget-samples 20000 \\
        --mode quality|incremental|halving --out probes/ [--base-mixture base.yaml --mix 0.5] \\
        [--launcher local|slurm] [--nproc-per-node N] [-- overrides...]

sources.yaml maps each candidate's name to one source or a list of sources, as a stage file writes them
({prefix: data/sft/x, weight: 1.0}); --base-mixture is a stage file whose sources every probe trains
too (the candidates then get --mix of the samples). Each probe is a pretrain_vlm.py run in OUT/NAME
(one stage of --budget-samples samples, from the weights of --init, the same seed for all), then
tools/evaluate.py on its last checkpoint into OUT/NAME/eval/iter_NNNNNNN. The baseline trains the base
mixture alone; without one it is --init evaluated as it is.

Modes: quality (each candidate on its own, ranked), incremental (candidates in file order, each kept
when the average holds within --tolerance points of the kept set's, else dropped), halving (for each
candidate with several sources: the mixture of everything without each half of it; a half's worth is
what the average loses without it). Rerunning the same command skips finished probes (OUT/NAME/
scores.json) and resumes a cut one from its checkpoint. --launcher slurm writes OUT/probes.sbatch
instead of running; --collect then writes the table.

Prints a table (each probe's benchmark scores on 0-100, the average, the gain over the baseline with a
paired bootstrap 95% interval over benchmark items, and the rank, decision or worth), also in
OUT/summary.json. Exit status: 0 done, 1 a probe's training or evaluation failed (its log's tail is
printed), 2 bad input, 128+N stopped by signal N (the trainer saved first). See docs/curation.md,
"Probing SFT sources".
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-config", required=True, help="the run config every probe trains with (YAML)")
    p.add_argument("--init", required=True, help="megasail checkpoint (root or iter_*) every probe starts from")
    p.add_argument("--candidates", required=True, help="YAML: candidate name -> source or list of sources")
    p.add_argument("--benchmark", action="append", required=True, metavar="FILE",
                   help="benchmark file for tools/evaluate.py (repeatable)")  # fmt: skip
    p.add_argument("--budget-samples", type=int, required=True, help="samples each probe trains")
    p.add_argument("--mode", default="quality", choices=("quality", "incremental", "halving"),
                   help="what to probe (default: quality)")  # fmt: skip
    p.add_argument("--out", default="probes", help="output directory: one subdirectory per probe (default: probes)")
    p.add_argument("--base-mixture", help="stage file whose sources every probe trains as well")
    p.add_argument("--mix", type=float, default=0.5,
                   help="with --base-mixture: the candidates' share of each probe's samples (default 0.5)")  # fmt: skip
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="incremental: keep a candidate when the average falls by at most this many points")  # fmt: skip
    p.add_argument("--seed", type=int, default=1234, help="seed and data.seed of every probe (default 1234)")
    p.add_argument("--trainable", default="vision,projector,language",
                   help="modules the probes train, comma-separated (default: all)")  # fmt: skip
    p.add_argument("--launcher", default="local", choices=("local", "slurm"),
                   help="local: run the probes here, one after another; slurm: write OUT/probes.sbatch")  # fmt: skip
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes (GPUs) per probe's training and evaluation; >1 launches torchrun")  # fmt: skip
    p.add_argument("--save-interval", type=int, default=50,
                   help="checkpoint.interval of the probes in steps (what a killed probe resumes from)")  # fmt: skip
    p.add_argument("--eval-saves", action="store_true",
                   help="evaluate every save of a probe, not only the last (points for tools/fit_scaling.py --runs)")  # fmt: skip
    p.add_argument("--eval-args", default="",
                   help="more tools/evaluate.py flags, one string: --eval-args='--max-new-tokens 8'")  # fmt: skip
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of each interval")
    p.add_argument("--only", metavar="NAME", help="run this probe only, no table (what a Slurm array task runs)")
    p.add_argument("--collect", action="store_true", help="run nothing: the table of the probes that finished")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="an #SBATCH line for --launcher slurm, e.g. --sbatch-arg=--time=4:00:00 (repeatable)")  # fmt: skip
    p.add_argument("--write-stage", metavar="FILE",
                   help="incremental: write the kept mixture as a stage file and print the command that trains it")  # fmt: skip
    p.add_argument("--stage-budget-samples", type=int,
                   help="budget_samples of --write-stage's stage (default: --budget-samples)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides for every probe's training, after --")
    args = p.parse_args(argv)
    if args.write_stage and args.mode != "incremental":
        p.error("--write-stage writes the kept mixture of --mode incremental")
    if args.nproc_per_node < 1 or args.save_interval < 1 or args.resamples < 1:
        p.error("--nproc-per-node, --save-interval and --resamples must be >= 1")
    return args


def settings_from_args(args):
    from megasail.curation.probes import ProbeSettings

    absolute = os.path.abspath
    return ProbeSettings(
        base_config=absolute(args.base_config), init=absolute(args.init), candidates_file=absolute(args.candidates),
        benchmarks=[absolute(b) for b in args.benchmark], budget_samples=args.budget_samples, mode=args.mode,
        out=absolute(args.out), base_mixture=absolute(args.base_mixture) if args.base_mixture else None,
        mix=args.mix, tolerance=args.tolerance, seed=args.seed,
        trainable=[m.strip() for m in args.trainable.split(",") if m.strip()], overrides=list(args.overrides),
        eval_args=shlex.split(args.eval_args), nproc_per_node=args.nproc_per_node,
        save_interval=args.save_interval, eval_saves=args.eval_saves, resamples=args.resamples, python=sys.executable,
    )  # fmt: skip


def local_argv(s) -> list[str]:
    """The command that runs these probes here (what a Slurm job runs)."""
    argv = [s.python, os.path.join(REPO, "tools", "probe_sources.py"), "--base-config", s.base_config,
            "--init", s.init, "--candidates", s.candidates_file, "--budget-samples", str(s.budget_samples),
            "--mode", s.mode, "--out", s.out, "--mix", repr(s.mix), "--tolerance", repr(s.tolerance),
            "--seed", str(s.seed), "--trainable", ",".join(s.trainable), "--nproc-per-node", str(s.nproc_per_node),
            "--save-interval", str(s.save_interval), "--resamples", str(s.resamples), "--no-progress"]  # fmt: skip
    argv += ["--eval-saves"] if s.eval_saves else []
    argv += [a for b in s.benchmarks for a in ("--benchmark", b)]
    if s.base_mixture:
        argv += ["--base-mixture", s.base_mixture]
    if s.eval_args:
        argv.append("--eval-args=" + shlex.join(s.eval_args))
    return argv + (["--", *s.overrides] if s.overrides else [])


def write_stage(args, s, summary: dict) -> None:
    """The kept mixture (the last kept probe's sources) as a stage file; prints the command that trains it."""
    import yaml

    if not summary.get("complete"):
        raise SystemExit("probe_sources.py: error: --write-stage: the incremental run has not finished")
    kept_probe = next(p for p in summary["probes"] if p["name"] == summary["kept_probe"] or
                      p.get("same_as") == summary["kept_probe"]) if summary["kept_probe"] != "baseline" else None  # fmt: skip
    sources = kept_probe["sources"] if kept_probe else (
        [dict(x) for x in next(p for p in summary["probes"] if p["name"] == "baseline")["sources"]])  # fmt: skip
    if not sources:
        raise SystemExit("probe_sources.py: error: --write-stage: no candidate was kept and there is no base mixture")
    name = os.path.splitext(os.path.basename(args.write_stage))[0]
    stage = {"name": name, "budget_samples": args.stage_budget_samples or s.budget_samples,
             "trainable": s.trainable, "init_checkpoint": s.init, "sources": sources}  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.write_stage)), exist_ok=True)
    with open(args.write_stage, "w", encoding="utf-8") as f:
        f.write(f"# kept by tools/probe_sources.py --mode incremental in {s.out}: "
                f"{', '.join(summary['kept']) or 'none'}; dropped: {', '.join(summary['dropped']) or 'none'}\n")  # fmt: skip
        yaml.safe_dump(stage, f, sort_keys=False)
    run_dir = os.path.splitext(args.write_stage)[0]
    launch = [sys.executable] if s.nproc_per_node == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(s.nproc_per_node)]  # fmt: skip
    command = launch + ["pretrain_vlm.py", "--config", s.base_config, "--stage", args.write_stage, *s.overrides,
                        f"checkpoint.save={run_dir}", f"checkpoint.load={run_dir}", f"logging.dir={run_dir}"]  # fmt: skip
    print(f"wrote {args.write_stage} ({len(sources)} sources); train it with:\n  {shlex.join(command)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from megasail.curation.probe_run import ProbeFailed, ProbeInterrupted
    from megasail.curation.probe_spec import ProbeSourcesError

    try:
        s = settings_from_args(args)
        if args.launcher == "slurm" and not (args.collect or args.only):
            return _write_slurm(args, s)
        from megasail.curation.probes import run_probes

        progress = None
        if not args.no_progress and not args.collect:
            from tqdm import tqdm

            total = 1 + len(s.candidates) + (sum(len(v) >= 2 for v in s.candidates.values()) if s.mode == "halving" else 0)
            progress = tqdm(total=total, unit="probe", desc="probes", file=sys.stderr)
        try:
            summary = run_probes(s, collect_only=args.collect, only=args.only, say=_say(progress), progress=progress)
        finally:
            if progress is not None:
                progress.close()
        if args.only:
            return 0
        print(f"\nprobes ({s.mode}, {s.budget_samples} samples each) in {s.out}; summary.json there\n")
        print(summary["table"])
        if args.write_stage:
            write_stage(args, s, summary)
        return 0
    except ProbeSourcesError as e:
        print(f"probe_sources.py: error: {e}", file=sys.stderr)
        return 2
    except ProbeFailed as e:
        print(f"probe_sources.py: {e}", file=sys.stderr)
        return 1
    except ProbeInterrupted as e:
        print(f"probe_sources.py: {e}; rerun the same command to resume", file=sys.stderr)
        return 128 + e.signum


def _say(progress):
    if progress is None:
        return lambda message: print(message, flush=True)
    return progress.write


def _write_slurm(args, s) -> int:
    from megasail.curation.probe_slurm import sbatch_script, submit_instructions, write_sbatch
    from megasail.curation.probes import planned_probes

    names = [p.name for p in planned_probes(s)]
    count = len(s.candidates) if s.mode == "incremental" else len(names)
    os.makedirs(s.out, exist_ok=True)
    text = sbatch_script(local_argv(s), names, s.out, s.mode, s.nproc_per_node, args.sbatch_arg, os.getcwd())
    path = write_sbatch(s.out, text)
    print(submit_instructions(path, local_argv(s) + ["--collect"], s.mode, count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
