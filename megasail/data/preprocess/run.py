"""Orchestration of a preprocessing run: checks before any work, units in parallel, merge, manifest.

Output of `run_preprocess(cfg)` for prefix P:
    P.bin / P.idx            token stream (megatron-core MMIDIDX, one document per sample)
    P.img.bin / P.img.idx    image sidecar
    P.rejects.jsonl          one line per rejected record: source, location, reason, message
    P.internal_errors.jsonl  only when megasail raised on a record (a bug): location and traceback
    P.manifest.json          written last; a prefix is complete iff it exists
Work in progress lives in P.parts/ (one finished shard per unit, plus plan.json), removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass

from megasail.data.preprocess.config import CHOICES, PreprocessConfig
from megasail.data.preprocess.manifest import build_manifest, manifest_fingerprint
from megasail.data.preprocess.pool import run_units_in_pool
from megasail.data.preprocess.rejects import REJECT_HINTS, REJECT_REASONS, top_reject_reasons
from megasail.data.preprocess.sources import InputError, InputFile, WorkUnit, expand_inputs, plan_units
from megasail.data.preprocess.worker import UnitContext, load_report, process_unit, unit_prefix
from megasail.data.preprocess.writer import StreamingMerge
from megasail.data.text.template import get_template
from megasail.data.text.tokenizer import MultimodalTokenizer, TokenizerError

FINAL_SUFFIXES = (
    ".manifest.json",
    ".bin",
    ".idx",
    ".img.bin",
    ".img.idx",
    ".rejects.jsonl",
)  # manifest first: removed first
INTERNAL_ERRORS_SUFFIX = ".internal_errors.jsonl"  # written only when there are internal errors
PLAN_FILE = "plan.json"
# Settings the output bytes do not depend on (left out of the resume fingerprint).
VOLATILE_SETTINGS = (
    "workers",
    "overwrite",
    "resume",
    "progress",
    "writer",
    "fsync_units",
    "inputs",
    "max_internal_errors",
)


class PreprocessError(RuntimeError):
    """A problem found before any work starts (bad settings, tokenizer, inputs or output location)."""


class InternalErrors(RuntimeError):
    """More records than --max-internal-errors raised an unexpected exception inside megasail (a bug)."""


class NoSamplesKept(RuntimeError):
    """The run finished but kept no sample (every record rejected, or none read). The prefix is written,
    its manifest saying 0 samples and why; training refuses it. `result` is run_preprocess's return."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def no_samples_message(prefix: str, manifest: dict) -> str:
    """What a run that kept no sample tells its user: the top reject reasons with counts, hints, files."""
    counts = manifest["counts"]
    if counts["read"] == 0:
        files = ", ".join(s["path"] for s in manifest["sources"][:3])
        head = f"the inputs hold no records ({len(manifest['sources'])} file(s): {files}; blank lines are skipped)"
    else:
        head = f"all {counts['read']} records read were rejected"
        if counts["internal_errors"]:
            head = (f"of {counts['read']} records read, {counts['rejected']} were rejected and "
                    f"{counts['internal_errors']} hit an internal error ({prefix}{INTERNAL_ERRORS_SUFFIX})")
    lines = [f"{prefix}: no sample kept: {head}."]
    reasons = manifest["rejected_by_reason"]
    if reasons:
        lines.append("Top reject reasons:")
        for reason, count in top_reject_reasons(reasons):
            hint = REJECT_HINTS.get(reason)
            lines.append(f"  {count:>8} {reason}: {REJECT_REASONS[reason]}" + (f" ({hint})" if hint else ""))
        if len(reasons) > 3:
            lines.append(f"  ... and {len(reasons) - 3} more reason(s)")
        lines.append(f"Every reject with its file:line: {prefix}.rejects.jsonl")
    lines.append(f"The prefix is written with 0 samples ({prefix}.manifest.json records why) and training "
                 "refuses it; fix the inputs and rerun with --overwrite.")
    return "\n".join(lines)


@dataclass
class RunPlan:
    config: PreprocessConfig
    tokenizer: MultimodalTokenizer
    inputs: list[InputFile]
    units: list[WorkUnit]
    parts_dir: str
    fingerprint: dict


def _check_settings(cfg: PreprocessConfig) -> None:
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise PreprocessError(
                f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}"
            )
    if not cfg.inputs:
        raise PreprocessError("no --input given")
    if not cfg.output_prefix:
        raise PreprocessError("no --output-prefix given")
    if cfg.overwrite and cfg.resume:
        raise PreprocessError("--overwrite and --resume exclude each other")
    for name in (
        "max_seq_length",
        "max_tiles",
        "max_image_pixels",
        "max_image_bytes",
        "max_line_bytes",
        "workers",
        "lines_per_unit",
    ):
        if getattr(cfg, name) < 1:
            raise PreprocessError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_internal_errors < 0:
        raise PreprocessError(f"--max-internal-errors must be >= 0, got {cfg.max_internal_errors}")
    for name in (cfg.template, cfg.caption_template):
        try:
            get_template(name)
        except ValueError as e:
            raise PreprocessError(str(e)) from None
    if cfg.image_root is not None and not os.path.isdir(cfg.image_root):
        raise PreprocessError(f"--image-root {cfg.image_root}: not a directory")


def _check_output_dir(prefix: str) -> None:
    out_dir = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".megasail-write-probe-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise PreprocessError(
            f"--output-prefix {prefix}: cannot write to {out_dir} ({e.strerror or e})"
        ) from None


def _existing_outputs(prefix: str, parts_dir: str) -> list[str]:
    found = [prefix + s for s in (*FINAL_SUFFIXES, INTERNAL_ERRORS_SUFFIX) if os.path.exists(prefix + s)]
    return found + ([parts_dir] if os.path.isdir(parts_dir) else [])


def remove_outputs(prefix: str, parts_dir: str) -> None:
    """Delete a previous result: the manifest first, so no half-deleted prefix looks complete."""
    for suffix in (*FINAL_SUFFIXES, INTERNAL_ERRORS_SUFFIX):
        for path in (prefix + suffix, prefix + suffix + ".tmp"):
            if os.path.exists(path):
                os.remove(path)
    shutil.rmtree(parts_dir, ignore_errors=True)


def _fingerprint(cfg: PreprocessConfig, tokenizer_identity: dict, inputs: list[InputFile]) -> dict:
    """Everything the output bytes depend on; a resumed run must match it exactly."""
    settings = asdict(cfg)
    for name in VOLATILE_SETTINGS:
        settings.pop(name)
    return {
        "settings": settings,
        "tokenizer_sha256": tokenizer_identity["sha256"],
        "inputs": [{"path": i.path, "size": i.size, "mtime_ns": os.stat(i.path).st_mtime_ns} for i in inputs],
    }


def plan_run(cfg: PreprocessConfig) -> RunPlan:
    """Every check that can fail before work starts; raises PreprocessError with what to do."""
    _check_settings(cfg)
    prefix = os.path.abspath(cfg.output_prefix)
    parts_dir = prefix + ".parts"
    try:
        tokenizer = MultimodalTokenizer.load(cfg.tokenizer)
    except TokenizerError as e:
        raise PreprocessError(f"--tokenizer: {e}") from None
    try:
        inputs = expand_inputs(cfg.inputs, cfg.input_format)
    except InputError as e:
        raise PreprocessError(str(e)) from None
    try:
        import megasail.data.format.native  # noqa: F401  (merge_shards is native: fail now, not after the work)
    except ImportError as e:
        raise PreprocessError(str(e)) from None
    _check_output_dir(prefix)
    existing = _existing_outputs(prefix, parts_dir)
    if existing and not (cfg.overwrite or cfg.resume):
        raise PreprocessError(
            f"--output-prefix {cfg.output_prefix}: {existing[0]} already exists; pass --overwrite to replace it"
            + (
                " or --resume to finish the interrupted run"
                if not os.path.exists(prefix + ".manifest.json")
                else ""
            )
        )
    fingerprint = _fingerprint(cfg, tokenizer.identity(), inputs)
    if cfg.resume and os.path.isdir(parts_dir):
        _check_resumable(parts_dir, fingerprint)
    elif cfg.resume and os.path.exists(prefix + ".manifest.json"):
        _check_finished(prefix + ".manifest.json", fingerprint)
    units = plan_units(inputs, cfg.lines_per_unit)
    return RunPlan(cfg, tokenizer, inputs, units, parts_dir, fingerprint)


def _fingerprint_differences(previous: dict, fingerprint: dict) -> list[str]:
    previous_settings = previous.get("settings", {}) if isinstance(previous, dict) else {}
    previous = previous if isinstance(previous, dict) else {}
    diff = [k for k in fingerprint["settings"] if previous_settings.get(k) != fingerprint["settings"][k]]
    if previous.get("inputs") != fingerprint["inputs"]:
        diff.append("inputs (paths, sizes or modification times)")
    if previous.get("tokenizer_sha256") != fingerprint["tokenizer_sha256"]:
        diff.append("tokenizer")
    return diff


def _check_resumable(parts_dir: str, fingerprint: dict) -> None:
    try:
        with open(os.path.join(parts_dir, PLAN_FILE)) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        return  # the run died before its plan was saved: nothing finished, start the units afresh
    if previous != fingerprint:
        diff = _fingerprint_differences(previous, fingerprint)
        raise PreprocessError(
            f"--resume: the unfinished run in {parts_dir} used different settings "
            f"({', '.join(diff)}); pass --overwrite to start over"
        )


def _check_finished(manifest_path: str, fingerprint: dict) -> None:
    """--resume on a complete prefix returns it as it is: only if it was made with these settings."""
    try:
        with open(manifest_path, encoding="utf-8") as f:
            previous = json.load(f).get("fingerprint")
    except (OSError, ValueError, AttributeError) as e:
        raise PreprocessError(
            f"--resume: cannot read {manifest_path} ({e}); pass --overwrite to start over"
        ) from None
    if previous is None:
        raise PreprocessError(
            f"--resume: {manifest_path} records no settings fingerprint (written by an older version), so it "
            "cannot be checked against these settings; pass --overwrite to start over"
        )
    current = manifest_fingerprint(fingerprint)
    if previous != current:
        raise PreprocessError(
            f"--resume: the finished prefix {manifest_path} was made with different settings "
            f"({', '.join(_fingerprint_differences(previous, current))}); pass --overwrite to start over"
        )


# Test hook: the main process kills itself with SIGKILL at a named point of the run:
#   merge:K   once K units have finished and been handed to the merge (later units still running)
#   finish    after the last unit, before the merge is finished (copies may be in flight)
#   rejects   after PREFIX.rejects.jsonl is in place, before the manifest
#   manifest  after the manifest is in place, before PREFIX.parts/ is removed
KILL_AT_ENV = "MEGASAIL_PREPROCESS_KILL_AT"


def _kill_point(name: str, finished_units: int = 0) -> None:
    point = os.environ.get(KILL_AT_ENV, "")
    if point == name or (name == "merge" and point.startswith("merge:") and finished_units >= int(point[6:])):
        os.kill(os.getpid(), signal.SIGKILL)


def _worker_died_message(prefix: str, parts_dir: str, units: list[WorkUnit]) -> str:
    def describe(u: WorkUnit) -> str:
        return f"{u.index} ({os.path.basename(u.path)}" + (
            f" from line {u.first_line})" if u.container == "jsonl" else ")"
        )

    shown = ", ".join(describe(u) for u in units[:10]) + (
        f" and {len(units) - 10} more" if len(units) > 10 else ""
    )
    return (
        f"a worker process died (killed by a signal, e.g. out of memory, or crashed); {len(units)} unit(s) "
        f"not finished: {shown}. The finished units are kept in {parts_dir} and {prefix} has no manifest; "
        "rerun with --resume to redo the unfinished units"
    )


def _progress_bar(cfg: PreprocessConfig, total_bytes: int):
    from tqdm import tqdm

    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="preprocess",
        disable=not (cfg.progress and sys.stderr.isatty()),
        dynamic_ncols=True,
    )


def execute(plan: RunPlan) -> dict:
    """Run the pending units, merge the shards in unit order, write rejects and (last) the manifest."""
    cfg = plan.config
    prefix = os.path.abspath(cfg.output_prefix)
    if cfg.resume and os.path.exists(prefix + ".manifest.json"):
        shutil.rmtree(plan.parts_dir, ignore_errors=True)  # complete already; only the cleanup was cut short
        return _finished_earlier(prefix, len(plan.units))
    _start_parts_dir(plan, prefix)
    reports = _kept_reports(plan)
    pending = [u for u in plan.units if u.index not in reports]
    started = time.perf_counter()
    bar = _progress_bar(cfg, sum(u.end_byte - u.start_byte for u in pending))
    show = _progress_display(bar, started)
    # Shards are merged into the output in unit order while later units run (kept units first).
    merge = StreamingMerge(prefix, [(u.index, unit_prefix(plan.parts_dir, u)) for u in plan.units])
    try:
        merge.feed(reports)
        _run_units(plan, prefix, pending, reports, merge, show)
        bar.refresh()
        bar.close()
        units_wall_seconds = time.perf_counter() - started
        ordered = [reports[u.index] for u in plan.units]
        _report_internal_errors(cfg, prefix, ordered)
        merge_started = time.perf_counter()
        _kill_point("finish")
        merge.finish()
        merge_seconds = time.perf_counter() - merge_started  # the merge's wall time after the units
    except BaseException:
        bar.close()
        merge.abort()
        raise
    manifest = _publish(plan, prefix, ordered)
    runtime = {
        "seconds": time.perf_counter() - started,
        "writer_seconds": sum(reports[u.index]["writer_seconds"] for u in pending),  # inside add_sample/finalize
        "unit_seconds": sum(reports[u.index]["seconds"] for u in pending),  # worker time over all units
        "units_wall_seconds": units_wall_seconds,  # wall time of the unit phase (all workers)
        "merge_seconds": merge_seconds,
        "merge_busy_seconds": merge.busy_seconds,  # all time inside the merger, most of it during the units
        "units_run": len(pending),
        "units_resumed": len(plan.units) - len(pending),
    }
    return {"manifest": manifest, "runtime": runtime}


def _finished_earlier(prefix: str, num_units: int) -> dict:
    """execute()'s result for a prefix an earlier run completed (its manifest, no work done)."""
    with open(prefix + ".manifest.json", encoding="utf-8") as f:
        manifest = json.load(f)
    runtime = dict.fromkeys(
        ("seconds", "writer_seconds", "unit_seconds", "units_wall_seconds", "merge_seconds", "merge_busy_seconds"),
        0.0,
    )
    return {"manifest": manifest, "runtime": {**runtime, "units_run": 0, "units_resumed": num_units}}


def _start_parts_dir(plan: RunPlan, prefix: str) -> None:
    """PREFIX.parts/ with the plan's fingerprint (a fresh run first removes earlier outputs)."""
    if not plan.config.resume:
        remove_outputs(prefix, plan.parts_dir)
    os.makedirs(plan.parts_dir, exist_ok=True)
    plan_path = os.path.join(plan.parts_dir, PLAN_FILE)
    with open(plan_path + ".tmp", "w") as f:
        json.dump(plan.fingerprint, f, sort_keys=True)
    os.replace(plan_path + ".tmp", plan_path)


def _kept_reports(plan: RunPlan) -> dict[int, dict]:
    """Reports of the units an interrupted run finished (kept in PREFIX.parts/), by unit index."""
    reports = {}
    for unit in plan.units:
        if (report := load_report(plan.parts_dir, unit)) is not None:
            reports[unit.index] = report
    return reports


def _progress_display(bar, started: float) -> Callable[[int, int], None]:
    """show(records, bytes): advance the bar by bytes read, with the samples so far and their rate."""
    records_seen = 0

    def show(records: int, nbytes: int) -> None:
        nonlocal records_seen
        records_seen += records
        rate = records_seen / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix_str(f"{records_seen} samples, {rate:.0f} samples/s", refresh=False)
        bar.update(nbytes)

    return show


def _run_units(plan: RunPlan, prefix: str, pending: list[WorkUnit], reports: dict[int, dict],
               merge: StreamingMerge, show: Callable[[int, int], None]) -> None:
    """Run the pending units (in this process, or in --workers spawned ones), each report into
    `reports` and the merge as soon as it is in."""
    cfg = plan.config
    ctx = UnitContext(cfg, plan.tokenizer, plan.parts_dir)
    if cfg.workers == 1 or len(pending) <= 1:
        for unit in pending:
            report = process_unit(unit, ctx, show)
            reports[report["unit"]] = report
            merge.feed(reports)
        return

    def take(finished: list[dict]) -> None:
        reports.update((report["unit"], report) for report in finished)
        merge.feed(reports)
        _kill_point("merge", len(reports))

    def died_message(finished: list[dict]) -> str:
        done = set(reports) | {report["unit"] for report in finished}
        return _worker_died_message(prefix, plan.parts_dir, [u for u in plan.units if u.index not in done])

    run_units_in_pool(pending, ctx, cfg.workers, take, show, died_message)


def _publish(plan: RunPlan, prefix: str, ordered: list[dict]) -> dict:
    """PREFIX.rejects.jsonl, then PREFIX.manifest.json (written last: the prefix is complete), then
    PREFIX.parts/ removed; returns the manifest."""
    with open(prefix + ".rejects.jsonl.tmp", "w", encoding="utf-8") as out:
        for unit in plan.units:
            with open(unit_prefix(plan.parts_dir, unit) + ".rejects.jsonl", encoding="utf-8") as f:
                shutil.copyfileobj(f, out)
    os.replace(prefix + ".rejects.jsonl.tmp", prefix + ".rejects.jsonl")
    _kill_point("rejects")
    manifest = build_manifest(plan, ordered)
    with open(prefix + ".manifest.json.tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(prefix + ".manifest.json.tmp", prefix + ".manifest.json")
    _kill_point("manifest")
    shutil.rmtree(plan.parts_dir, ignore_errors=True)
    return manifest


def _report_internal_errors(cfg: PreprocessConfig, prefix: str, reports: list[dict]) -> None:
    """Write PREFIX.internal_errors.jsonl when megasail raised on some records; raise InternalErrors
    when there are more than --max-internal-errors (the finished units stay for --resume)."""
    errors = [entry for report in reports for entry in report.get("internal_errors", [])]
    path = prefix + INTERNAL_ERRORS_SUFFIX
    if not errors:
        if os.path.exists(path):
            os.remove(path)  # from an earlier attempt whose bug is fixed
        return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e, ensure_ascii=False) + "\n" for e in errors)
    os.replace(path + ".tmp", path)
    if len(errors) > cfg.max_internal_errors:
        first = errors[0]
        raise InternalErrors(
            f"{len(errors)} record(s) raised an unexpected exception inside megasail (a bug, not bad input; "
            f"not counted as rejects); --max-internal-errors is {cfg.max_internal_errors}. First, at "
            f"{first['location']}: {first['error']}\n{first['traceback'].rstrip()}\n"
            f"All of them with tracebacks: {path}. {prefix} has no manifest; after a fix rerun with --resume "
            "(the units with errors are redone), or pass --max-internal-errors N to accept up to N of them"
        )


def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Plan, check and run; returns {"manifest": ..., "runtime": {...}}. Raises PreprocessError early,
    and NoSamplesKept after a run whose prefix holds no sample."""
    result = execute(plan_run(cfg))
    if result["manifest"]["num_samples"] == 0:
        raise NoSamplesKept(no_samples_message(cfg.output_prefix, result["manifest"]), result)
    return result


def reconcile(manifest: dict) -> Counter:
    """read - written - rejected - internal errors per source; all zero for a consistent manifest."""
    return Counter(
        {
            s["path"]: s["read"] - s["written"] - s["rejected"] - s["internal_errors"]
            for s in manifest["sources"]
        }
    )
