"""Per-step metrics: LOGGING_DIR/metrics.jsonl, a compact console line with ETA, a wandb mirror.

TFLOP/s per device, ``mfu`` and ``hfu`` (recomputation included) follow the one FLOPs convention and
peak table of ``megasail.models.flops`` (real tokens only, causal attention per sample, frozen parts
charged what their backward runs); on a CPU, or an unknown GPU, MFU and HFU are null.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import torch

log = logging.getLogger(__name__)

REQUIRED_KEYS = (
    "step",
    "stage",
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "tflops_per_device",
    "mfu",
    "hfu",
    "mem_gb",
    "skipped_samples",
    "step_time_spread",
)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    text = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {text}" if days else text


def console_line(m: dict, stage_fraction: float | None, eta_s: float | None) -> str:
    """One compact line: step, stage progress and ETA to the stage budget, loss, lr, rates."""
    stage = m["stage"]
    if stage_fraction is not None:
        stage += f" {100 * stage_fraction:5.1f}% ETA {_format_eta(eta_s)}"
    mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a"
    return (
        f"step {m['step']:>6} | {stage} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | gnorm {m['grad_norm']:.3f}"
        f" | {m['tokens_per_s']:,.0f} tok/s | {m['tflops_per_device']:.3f} TFLOP/s/dev | MFU {mfu}"
        f" | {m['mem_gb']:.2f} GB | skipped {m['skipped_steps']} steps/{m['skipped_samples']} samples"
    )


class MetricsLogger:
    """Writes metrics on one rank (``active``); every other rank's calls are no-ops.

    ``open(step, wandb_run_id)`` starts the outputs once the run knows the step it starts at: rows of
    metrics.jsonl after that step (left by a run killed after its last checkpoint) are moved to
    metrics.jsonl.stale, so every step has exactly one row; a resumed run continues its wandb run.
    """

    def __init__(
        self,
        active: bool,
        directory: str | None,
        use_wandb: bool,
        project: str,
        run_name: str | None,
        config: dict | None,
        log_interval: int = 1,
    ):
        self.active = active
        self.directory = directory
        self.use_wandb = use_wandb
        self.project, self.run_name, self.config = project, run_name, config
        self.log_interval = log_interval
        self.file = None
        self.wandb = None

    @property
    def wandb_run_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def open(self, step: int, wandb_run_id: str | None = None) -> None:
        """Start writing: rows after ``step`` set aside, metrics.jsonl opened, wandb started or resumed."""
        if not self.active:
            return
        if self.directory:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, "metrics.jsonl")
            moved = set_aside_rows_after(path, step)
            if moved:
                log.warning("%s: %d rows after step %d (steps not in the checkpoint resumed from) moved to "
                            "%s.stale", path, moved, step, path)
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if self.use_wandb:
            self.wandb = start_wandb(self.directory, self.project, self.run_name, self.config, wandb_run_id)

    def log(self, metrics: dict, stage_fraction: float | None = None, eta_s: float | None = None) -> None:
        if not self.active:
            return
        if self.file is not None:
            self.file.write(json.dumps(metrics, default=float) + "\n")
            self.file.flush()
        if self.wandb is not None:
            flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
            flat.update(
                {
                    f"loader/{k}": v
                    for k, v in metrics.get("loader", {}).items()
                    if isinstance(v, (int, float))
                }
            )
            self.wandb.log(flat, step=metrics["step"])
        if metrics["step"] % self.log_interval == 0:
            print(console_line(metrics, stage_fraction, eta_s), file=sys.stdout, flush=True)

    def print(self, text: str) -> None:
        if self.active:
            print(text, flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def set_aside_rows_after(path: str, step: int) -> int:
    """Move the rows of a metrics.jsonl whose step is after ``step`` to PATH.stale (appended, nothing
    deleted); the file is rewritten through a temp file and a rename. Returns the rows moved."""
    if not os.path.isfile(path):
        return 0
    kept, stale = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row_step = json.loads(line).get("step")
            except json.JSONDecodeError:  # a row torn by a kill: set aside too
                row_step = None
            (kept if isinstance(row_step, int) and row_step <= step else stale).append(line.rstrip("\n") + "\n")
    if not stale:
        return 0
    with open(path + ".stale", "a", encoding="utf-8") as f:
        f.writelines(stale)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return len(stale)


def _logged_in_to_wandb() -> bool:
    """An API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_directory(directory: str | None) -> str:
    """Where wandb writes its files: LOGGING_DIR, else $WANDB_DIR, else ~/.cache/megasail (never the cwd)."""
    where = directory or os.environ.get("WANDB_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "megasail")
    os.makedirs(where, exist_ok=True)
    return where


def start_wandb(directory, project, run_name, config, run_id: str | None = None):
    """wandb.init offline unless logged in (WANDB_MODE wins when set); ``run_id`` continues that run."""
    try:
        import wandb
    except ImportError:
        log.warning(
            "logging.wandb=true but wandb is not installed: metrics go to metrics.jsonl only "
            "(pip install wandb, or set logging.wandb=false)"
        )
        return None
    mode = os.environ.get("WANDB_MODE") or ("online" if _logged_in_to_wandb() else "offline")
    run = wandb.init(
        project=project,
        name=run_name,
        dir=wandb_directory(directory),
        mode=mode,
        config=config,
        id=run_id,
        resume="allow" if run_id else None,
    )
    log.info("wandb run %s (%s) in %s", run.id, mode, run.dir)
    return run


def memory_gb() -> float:
    """Peak device memory of this rank (GPU), or the process's peak resident memory (CPU), in GB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
