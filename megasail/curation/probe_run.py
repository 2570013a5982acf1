"""Running one probe: an ordinary pretrain_vlm.py run in OUT/NAME, then tools/evaluate.py on its last checkpoint.

OUT/NAME/ holds

    probe.json            what the probe is (candidates, stage sources, budget, seed, init, config, benchmarks)
    stage.yaml            the one-stage curriculum it trains (init_checkpoint: --init, budget_samples)
    ckpt/                 checkpoint.save = checkpoint.load: a killed probe resumes from its last save
    metrics.jsonl         logging.dir = OUT/NAME (what tools/fit_scaling.py --runs reads), config.yaml
    train.log, eval.log   the two commands' output
    eval/iter_NNNNNNN/    tools/evaluate.py's output for that checkpoint step (predictions, scores.json); with
                          eval_saves every kept save is evaluated, points for tools/fit_scaling.py --runs
    scores.json           a link to eval/iter_NNNNNNN/scores.json, made last: the probe is finished

A rerun skips finished probes, resumes a probe whose training was cut (its checkpoint), and continues an
evaluation that was cut (evaluate.py's own resume). A baseline without base mixture trains nothing: its
evaluation is the initial checkpoint's, in OUT/baseline/eval/iter_NNNNNNN.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys

from megasail.curation.probe_spec import Probe, ProbeSourcesError, stage_dict

PROBE_FILE = "probe.json"
STAGE_FILE = "stage.yaml"
CKPT_DIR = "ckpt"
EVAL_DIR = "eval"
SCORES = "scores.json"
TRAIN_LOG = "train.log"
EVAL_LOG = "eval.log"
KEEP_ALL = 1_000_000  # checkpoint.keep_last when every save is evaluated
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_STEP_LINE = re.compile(r"^step\s+(\d+) \| \S+\s+([\d.]+%)")


class ProbeInterrupted(RuntimeError):
    """The tool was asked to stop (SIGTERM/SIGINT) while a probe ran; the probe's command was told too."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class ProbeFailed(RuntimeError):
    """A probe's training or evaluation exited with an error; the message names its log."""


def probe_dir(out: str, name: str) -> str:
    return os.path.join(out, name)


def probe_record(probe: Probe, settings) -> dict:
    """probe.json: the probe and everything that decides its scores (``spec``; a rerun must match it)."""
    spec = {
        "sources": [dict(s) for s in probe.sources],
        "trains": probe.trains,
        "init": settings.init,
        "benchmarks": list(settings.benchmarks),
        "eval_args": list(settings.eval_args),
    }
    if probe.trains:
        spec.update(
            base_config=settings.base_config,
            budget_samples=settings.budget_samples,
            seed=settings.seed,
            trainable=list(settings.trainable),
            overrides=list(settings.overrides),
        )
    return {
        "name": probe.name,
        "kind": probe.kind,
        "candidates": list(probe.candidates),
        "without": list(probe.without),
        "group": probe.group,
        "half": probe.half,
        "spec": spec,
    }


def read_record(directory: str) -> dict | None:
    path = os.path.join(directory, PROBE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def claim(out: str, probe: Probe, settings) -> str:
    """Make OUT/NAME with probe.json and stage.yaml, or check that the one there is this probe; returns it."""
    import yaml

    directory = probe_dir(out, probe.name)
    record = probe_record(probe, settings)
    existing = read_record(directory)
    if existing is not None:
        old, new = existing.get("spec", {}), record["spec"]
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise ProbeSourcesError(
                f"{directory} holds probe {probe.name!r} made with other settings ({', '.join(changed)} "
                f"differ): choose another --out, or delete {directory} to probe it again"
            )
        return directory
    os.makedirs(directory, exist_ok=True)
    if probe.trains:
        stage = stage_dict(probe, settings.budget_samples, settings.init, settings.trainable)
        _write_atomically(os.path.join(directory, STAGE_FILE), yaml.safe_dump(stage, sort_keys=False))
    _write_atomically(os.path.join(directory, PROBE_FILE), json.dumps(record, indent=1) + "\n")
    return directory


def is_finished(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, SCORES))


def finished_eval_dir(directory: str) -> str:
    """The evaluation directory a finished probe's scores.json links to."""
    return os.path.dirname(os.path.realpath(os.path.join(directory, SCORES)))


def find_same(out: str, record: dict) -> str | None:
    """The name of a finished probe in OUT with this spec (a quality probe is incremental's first step)."""
    if not os.path.isdir(out):
        return None
    for name in sorted(os.listdir(out)):
        other = read_record(probe_dir(out, name))
        if other and other["name"] != record["name"] and other.get("spec") == record["spec"]:
            if is_finished(probe_dir(out, name)):
                return name
    return None


def checkpoint_state(root: str) -> tuple[str | None, bool]:
    """(latest step dir or None, whether its run spent the stage's budget)."""
    from megasail.checkpoint import latest_checkpoint, read_meta

    if not os.path.isdir(root):
        return None, False
    step = latest_checkpoint(root)
    if step is None:
        return None, False
    position = read_meta(step).get("loader_state", {}).get("position", {})
    return step, bool(position.get("finished"))


def published_steps(root: str) -> list[str]:
    """The step dirs under a checkpoint root, oldest first."""
    from megasail.checkpoint import published_steps as complete_saves

    return [path for _, path in complete_saves(root)]


def _launch(settings, script: str) -> list[str]:
    if settings.nproc_per_node > 1:
        return [settings.python, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(settings.nproc_per_node), script]  # fmt: skip
    return [settings.python, script]


def train_command(settings, directory: str) -> list[str]:
    """pretrain_vlm.py on the probe's stage; the probe's own keys come after the user's overrides."""
    ckpt = os.path.join(directory, CKPT_DIR)
    return _launch(settings, os.path.join(REPO, "pretrain_vlm.py")) + [
        "--config", settings.base_config, "--stage", os.path.join(directory, STAGE_FILE),
        *settings.overrides,
        f"seed={settings.seed}", f"data.seed={settings.seed}", "train.iters=null",
        f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}", f"checkpoint.interval={settings.save_interval}",
        f"logging.dir={directory}",
        *([f"checkpoint.keep_last={KEEP_ALL}"] if settings.eval_saves else []),
    ]  # fmt: skip


def eval_command(settings, load: str, output_dir: str) -> list[str]:
    bench = [a for b in settings.benchmarks for a in ("--benchmark", b)]
    return _launch(settings, os.path.join(REPO, "tools", "evaluate.py")) + [
        "--load", load, *bench, "--output-dir", output_dir, "--no-progress", *settings.eval_args,
    ]  # fmt: skip


def run_logged(cmd: list[str], log_path: str, on_step=None) -> int:
    """Run cmd with its output appended to log_path; returns its exit status.

    A SIGTERM or SIGINT to this process is passed on to cmd as SIGTERM (the trainer saves a checkpoint and
    exits), then ProbeInterrupted is raised. on_step(step, percent) is called for each trainer step line.
    """
    interrupted: list[int] = []
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)

        def forward(signum, frame):
            interrupted.append(signum)
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for line in child.stdout:
                log.write(line)
                log.flush()
                match = on_step and _STEP_LINE.match(line)
                if match:
                    on_step(int(match.group(1)), match.group(2))
            status = child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    if interrupted:
        raise ProbeInterrupted(interrupted[0])
    return status


def _tail(path: str, lines: int = 15) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _link_scores(directory: str, eval_dir: str) -> None:
    """OUT/NAME/scores.json -> eval/iter_N/scores.json (relative), replacing any older link atomically."""
    target = os.path.relpath(os.path.join(eval_dir, SCORES), directory)
    tmp = os.path.join(directory, f"{SCORES}.tmp.{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, os.path.join(directory, SCORES))


def evaluate_step(settings, directory: str, step: str, say=print) -> str:
    """Evaluate checkpoint step dir `step` into OUT/NAME/eval/<its name>; returns that directory."""
    eval_dir = os.path.join(directory, EVAL_DIR, os.path.basename(step.rstrip("/")))
    if not os.path.isfile(os.path.join(eval_dir, SCORES)):
        log = os.path.join(directory, EVAL_LOG)
        if run_logged(eval_command(settings, step, eval_dir), log) != 0:
            raise ProbeFailed(f"evaluation of {step} failed; last lines of {log}:\n{_tail(log)}")
    return eval_dir


def run_probe(probe: Probe, settings, directory: str, say=print, on_step=None) -> None:
    """Train (or resume) and evaluate one claimed probe; returns when OUT/NAME/scores.json exists."""
    if is_finished(directory):
        return
    if not probe.trains:
        step, _ = checkpoint_state(settings.init)
        if step is None:
            raise ProbeSourcesError(f"--init {settings.init}: no megasail checkpoint there")
        say(f"[probes] {probe.name}: evaluating --init {step} (no training: no base mixture)")
    else:
        ckpt = os.path.join(directory, CKPT_DIR)
        step, done = checkpoint_state(ckpt)
        if not done:
            say(f"[probes] {probe.name}: training "
                + (f"(resuming {os.path.basename(step)})" if step else "from --init")
                + f", log {os.path.join(directory, TRAIN_LOG)}")  # fmt: skip
            log = os.path.join(directory, TRAIN_LOG)
            if run_logged(train_command(settings, directory), log, on_step) != 0:
                raise ProbeFailed(f"training of probe {probe.name!r} failed; last lines of {log}:\n{_tail(log)}")
            step, done = checkpoint_state(ckpt)
            if not done:
                raise ProbeFailed(
                    f"probe {probe.name!r}: training exited without spending its budget (latest checkpoint "
                    f"{step}); see {log}"
                )
        if settings.eval_saves:  # the earlier saves first: a curve of score against samples seen
            for earlier in published_steps(ckpt):
                if earlier != step:
                    say(f"[probes] {probe.name}: evaluating {os.path.basename(earlier)}")
                    evaluate_step(settings, directory, earlier, say)
        say(f"[probes] {probe.name}: evaluating {os.path.basename(step)}")
    eval_dir = evaluate_step(settings, directory, step, say)
    _link_scores(directory, eval_dir)


def python_executable() -> str:
    return sys.executable
