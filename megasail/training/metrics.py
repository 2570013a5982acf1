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
    """Writes metrics on one rank (``active``); every other rank's calls are no-ops."""

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
        self.log_interval = log_interval
        self.file = None
        self.wandb = None
        if not active:
            return
        if directory:
            os.makedirs(directory, exist_ok=True)
            self.file = open(os.path.join(directory, "metrics.jsonl"), "a", encoding="utf-8")  # noqa: SIM115
        if use_wandb:
            self.wandb = self._start_wandb(directory, project, run_name, config)

    @staticmethod
    def _start_wandb(directory, project, run_name, config):
        try:
            import wandb
        except ImportError:
            log.warning(
                "logging.wandb=true but wandb is not installed: metrics go to metrics.jsonl only "
                "(pip install wandb, or set logging.wandb=false)"
            )
            return None
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        return wandb.init(project=project, name=run_name, dir=directory, mode=mode, config=config)

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


def memory_gb() -> float:
    """Peak device memory of this rank (GPU), or the process's peak resident memory (CPU), in GB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux
