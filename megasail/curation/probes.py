"""SFT source probing, SAIL-VL style: short runs from one checkpoint on candidate data, judged on benchmarks.

Every probe trains ``budget_samples`` samples from the weights of ``init`` with the same seed (so scores
differ by data only), then is evaluated (``megasail.curation.probe_run``). Modes:

- quality: one probe per candidate (alone, or mixed into the base mixture at ``mix``), against the
  baseline (the base mixture alone; the ``init`` checkpoint itself without a base mixture).
- incremental: candidates in file order; probe k trains the base + the candidates kept so far + candidate
  k; it is kept when its average is at least that of the kept set's own probe minus ``tolerance``.
- halving: a reference probe ``all`` (base + every candidate) and, for each candidate with two or more
  sources, two probes each leaving out one half of its sources; a half's worth is ``all`` minus the probe
  without it.

A probe whose spec equals a finished probe's in the same output directory reuses its scores (a quality
probe is incremental's first step). ``run_probes`` returns summary.json's object and writes it.
"""

from __future__ import annotations

import dataclasses
import os

from megasail.curation.probe_report import ProbeResults, format_probe_table, probe_entry, write_summary
from megasail.curation.probe_run import claim, find_same, probe_dir, probe_record, read_record, run_probe
from megasail.curation.probe_spec import (
    Probe,
    ProbeSourcesError,
    halves,
    mixture,
    read_base_mixture,
    read_candidates,
)

MODES = ("quality", "incremental", "halving")


@dataclasses.dataclass
class ProbeSettings:
    """Everything a probe run depends on (paths absolute)."""

    base_config: str
    init: str
    candidates_file: str
    benchmarks: list[str]
    budget_samples: int
    mode: str
    out: str
    base_mixture: str | None = None
    mix: float = 0.5
    tolerance: float = 0.0
    seed: int = 1234
    trainable: list[str] = dataclasses.field(default_factory=lambda: ["vision", "projector", "language"])
    overrides: list[str] = dataclasses.field(default_factory=list)
    eval_args: list[str] = dataclasses.field(default_factory=list)
    nproc_per_node: int = 1
    save_interval: int = 50
    eval_saves: bool = False
    resamples: int = 1000
    python: str = "python"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ProbeSourcesError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.budget_samples < 1:
            raise ProbeSourcesError(f"--budget-samples must be >= 1, got {self.budget_samples}")
        if not 0.0 < self.mix < 1.0:
            raise ProbeSourcesError(f"--mix is the candidates' share of the samples, in (0, 1); got {self.mix}")
        for path, flag in [(self.base_config, "--base-config"), (self.candidates_file, "--candidates"),
                           *[(b, "--benchmark") for b in self.benchmarks]]:  # fmt: skip
            if not os.path.isfile(path):
                raise ProbeSourcesError(f"{flag} {path}: no such file")
        if not os.path.exists(self.init):
            raise ProbeSourcesError(f"--init {self.init}: no such checkpoint directory")
        self.candidates = read_candidates(self.candidates_file)
        self.base = read_base_mixture(self.base_mixture) if self.base_mixture else None


def _probe(settings: ProbeSettings, name: str, kind: str, chosen: list[str], **extra) -> Probe:
    without = frozenset(extra.get("without", ()))
    sources = mixture(settings.base, settings.candidates, chosen, settings.mix, without)
    return Probe(name=name, kind=kind, candidates=tuple(chosen), sources=sources, **extra)


def baseline_probe(settings: ProbeSettings) -> Probe:
    """The base mixture alone; without one, --init evaluated as it is."""
    if settings.base is None:
        return Probe(name="baseline", kind="baseline", candidates=(), sources=(), trains=False)
    return _probe(settings, "baseline", "baseline", [])


def quality_probes(settings: ProbeSettings) -> list[Probe]:
    return [_probe(settings, name, "quality", [name]) for name in settings.candidates]


def incremental_probe(settings: ProbeSettings, step: int, kept: list[str], candidate: str) -> Probe:
    return _probe(settings, f"inc{step:02d}_{candidate}", "incremental", [*kept, candidate])


def halving_probes(settings: ProbeSettings) -> list[Probe]:
    everything = list(settings.candidates)
    probes = [_probe(settings, "all", "halving", everything)]
    for group, sources in settings.candidates.items():
        if len(sources) < 2:
            continue
        for half, left_out in enumerate(halves(sources), 1):
            probes.append(_probe(settings, f"{group}_without_half{half}", "halving", everything,
                                 without=tuple(s.prefix for s in left_out), group=group, half=half))  # fmt: skip
    return probes


def planned_probes(settings: ProbeSettings) -> list[Probe]:
    """The probes known before any result: the baseline and, except in incremental mode, all the others."""
    plan = [baseline_probe(settings)]
    if settings.mode == "quality":
        plan += quality_probes(settings)
    elif settings.mode == "halving":
        plan += halving_probes(settings)
    return plan


class ProbeRunner:
    """Claims, runs (unless ``collect_only``) and records probes in settings.out."""

    def __init__(self, settings: ProbeSettings, collect_only: bool = False, say=print, progress=None):
        self.settings, self.collect_only, self.say, self.progress = settings, collect_only, say, progress
        self.results = ProbeResults(settings.out, n_resamples=settings.resamples)
        self.entries: list[tuple[Probe, str | None]] = []  # (probe, the finished probe it reuses)

    def source_of(self, probe: Probe) -> str | None:
        """The probe whose scores stand for this one: itself, a finished same-spec probe, or None (pending)."""
        directory = probe_dir(self.settings.out, probe.name)
        if read_record(directory) is None:
            same = find_same(self.settings.out, probe_record(probe, self.settings))
            if same:
                return same
        if self.collect_only:
            if read_record(directory) is None:
                return None
            claim(self.settings.out, probe, self.settings)  # a changed spec is refused here too
            return probe.name if self.results.finished(probe.name) else None
        directory = claim(self.settings.out, probe, self.settings)
        on_step = None
        if self.progress is not None:
            self.progress.set_description(f"probe {probe.name}")

            def on_step(step, percent):
                self.progress.set_postfix_str(f"step {step}, {percent} of its budget")

        run_probe(probe, self.settings, directory, say=self.say, on_step=on_step)
        return probe.name

    def run(self, probe: Probe) -> str | None:
        source = self.source_of(probe)
        same_as = source if source not in (None, probe.name) else None
        if same_as:
            self.say(f"[probes] {probe.name}: same data, budget and settings as finished probe {same_as}")
        self.entries.append((probe, same_as))
        if self.progress is not None and source is not None:
            self.progress.update(1)
        return source


def _incremental(runner: ProbeRunner, baseline: str | None) -> dict:
    settings = runner.settings
    kept: list[str] = []
    reference = baseline
    decisions = []
    for step, candidate in enumerate(settings.candidates, 1):
        if reference is None:
            break  # the reference is not finished (collect before the run got here)
        probe = incremental_probe(settings, step, kept, candidate)
        source = runner.run(probe)
        if source is None:
            break
        comparison = runner.results.compare(reference, source)
        keep = comparison["difference"] >= -settings.tolerance
        decisions.append({
            "step": step, "candidate": candidate, "probe": probe.name, "reference": reference,
            "difference": comparison["difference"], "interval": comparison["interval"],
            "decision": "kept" if keep else "dropped",
        })  # fmt: skip
        if keep:
            kept.append(candidate)
            reference = source
    done = len(decisions) == len(settings.candidates)
    return {
        "decisions": decisions,
        "kept": kept,
        "dropped": [d["candidate"] for d in decisions if d["decision"] == "dropped"],
        "complete": done,
        "kept_probe": reference if done else None,
    }


def _notes(summary: dict, mode_result: dict) -> None:
    """The last column: rank among candidates (quality), decision (incremental), a half's worth (halving)."""
    by_name = {p["name"]: p for p in summary["probes"]}
    if summary["mode"] == "quality":
        ranked = sorted((p for p in summary["probes"] if p["kind"] == "quality" and p["finished"]),
                        key=lambda p: -p["average"])  # fmt: skip
        for rank, p in enumerate(ranked, 1):
            p["rank"] = rank
            p["note"] = f"{rank} of {len(ranked)}"
    elif summary["mode"] == "incremental":
        for d in mode_result["decisions"]:
            by_name[d["probe"]]["note"] = (
                f"{d['decision']}: {d['difference']:+.2f} [{d['interval'][0]:+.2f}, {d['interval'][1]:+.2f}] "
                f"vs {d['reference']}"
            )
    else:
        for h in mode_result.get("halves", []):
            by_name[h["probe"]]["note"] = (
                f"{h['worth']:+.2f} [{h['interval'][0]:+.2f}, {h['interval'][1]:+.2f}] ({', '.join(h['left_out'])})"
            )


def run_probes(settings: ProbeSettings, collect_only: bool = False, only: str | None = None, say=print,
               progress=None) -> dict:  # fmt: skip
    """Run the mode's probes (or, with collect_only, read what finished), write summary.json; return it.

    only: run just the probe of that name (a Slurm array task) and return {} without a summary.
    """
    os.makedirs(settings.out, exist_ok=True)
    runner = ProbeRunner(settings, collect_only=collect_only, say=say, progress=progress)
    plan = planned_probes(settings)
    if only is not None:
        named = {p.name: p for p in plan}
        if only not in named:
            raise ProbeSourcesError(f"--only {only!r}: no such probe in {settings.mode} mode ({', '.join(named)})")
        runner.run(named[only])
        return {}
    baseline = runner.run(plan[0])
    mode_result: dict = {}
    if settings.mode == "incremental":
        mode_result = _incremental(runner, baseline)
    else:
        sources = {p.name: runner.run(p) for p in plan[1:]}
        if settings.mode == "halving":
            mode_result["halves"] = []
            reference = sources.get("all")
            for p in plan[1:]:
                if p.group is None or reference is None or sources[p.name] is None:
                    continue
                comparison = runner.results.compare(sources[p.name], reference)
                mode_result["halves"].append({
                    "group": p.group, "half": p.half, "left_out": [os.path.basename(x) for x in p.without],
                    "probe": p.name, "worth": comparison["difference"], "interval": comparison["interval"],
                })  # fmt: skip
    baseline_name = baseline or "baseline"
    summary = {
        "mode": settings.mode,
        "out": settings.out,
        "init": settings.init,
        "base_config": settings.base_config,
        "base_mixture": settings.base_mixture,
        "mix": settings.mix if settings.base else None,
        "budget_samples": settings.budget_samples,
        "seed": settings.seed,
        "tolerance": settings.tolerance if settings.mode == "incremental" else None,
        "benchmarks": settings.benchmarks,
        "benchmark_names": [os.path.splitext(os.path.basename(b))[0] for b in settings.benchmarks],
        "baseline": baseline_name,
        "probes": [
            probe_entry(runner.results, p.name, probe_record(p, settings), baseline_name, same_as)
            for p, same_as in runner.entries
        ],
        **mode_result,
    }
    _notes(summary, mode_result)
    summary["table"] = format_probe_table(summary)
    write_summary(settings.out, summary)
    return summary
