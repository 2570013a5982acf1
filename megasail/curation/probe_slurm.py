"""``--launcher slurm``: OUT/probes.sbatch runs the probes as Slurm jobs, one node each.

quality and halving: a job array, one task per probe (``tools/probe_sources.py ... --only NAME``); the
probes are independent, so they run side by side. incremental: probe k's data depends on the decisions
before it, so the script is one job that runs the whole chain in order on its node (the local launcher
inside the job); resubmitting it after a time limit or a preemption skips finished probes and resumes
the cut one from its checkpoint. Either way ``--collect`` afterwards (or as a dependent job) writes
OUT/summary.json and prints the table.
"""

from __future__ import annotations

import os
import shlex

SBATCH_FILE = "probes.sbatch"


def sbatch_script(tool_argv: list[str], names: list[str], out: str, mode: str, nproc_per_node: int,
                  sbatch_args: list[str], workdir: str) -> str:  # fmt: skip
    """The script's text. tool_argv: the command that runs tools/probe_sources.py locally (no --only)."""
    lines = ["#!/bin/bash", "#SBATCH --job-name=probes", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1"]
    if nproc_per_node > 1:
        lines.append(f"#SBATCH --gpus-per-node={nproc_per_node}")
    # SIGTERM to the batch shell (exec'd into the tool) ahead of the limit: the trainer saves, a rerun resumes
    lines.append("#SBATCH --signal=B:TERM@300")
    if mode == "incremental":
        lines.append(f"#SBATCH --output={os.path.join(out, 'slurm-%j.log')}")
    else:
        lines += [f"#SBATCH --array=0-{len(names) - 1}", f"#SBATCH --output={os.path.join(out, 'slurm-%A_%a.log')}"]
    lines += [f"#SBATCH {a}" for a in sbatch_args]
    lines += ["set -euo pipefail", f"cd {shlex.quote(workdir)}", "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"]
    command = shlex.join(tool_argv)
    if mode == "incremental":
        lines += [f"# incremental: the probes run one after another in this job ({len(names)} candidates)",
                  f"exec {command}"]  # fmt: skip
    else:
        lines += [f"probes=({' '.join(shlex.quote(n) for n in names)})",
                  f'exec {command} --only "${{probes[$SLURM_ARRAY_TASK_ID]}}"']  # fmt: skip
    return "\n".join(lines) + "\n"


def write_sbatch(out: str, text: str) -> str:
    path = os.path.join(out, SBATCH_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def submit_instructions(path: str, collect_argv: list[str], mode: str, count: int) -> str:
    collect = shlex.join(collect_argv)
    what = f"one job running the {count} incremental steps in order" if mode == "incremental" else \
        f"an array of {count} probes"  # fmt: skip
    return (
        f"wrote {path}: {what}. Submit, then build the table when it has finished:\n"
        f"  jobid=$(sbatch --parsable {shlex.quote(path)})\n"
        f"  sbatch --dependency=afterany:$jobid --wrap {shlex.quote(collect)}    # or run it yourself later\n"
        f"Resubmitting after a time limit or failure skips finished probes and resumes cut ones."
    )
