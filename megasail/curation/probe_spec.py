"""What one source probe trains: candidate sources, the base mixture, and the one-stage curriculum of a probe.

A candidates file (``sources.yaml``) names each candidate; a candidate is one source or a group of
sources, each written as a curriculum stage writes its sources (``examples/configs/stages/``):

    good_qa: {prefix: data/sft/good_qa, weight: 1.0}
    documents:                                  # a group: probed together; halving splits it
      - {prefix: data/sft/docvqa, weight: 2.0}
      - {prefix: data/sft/chartqa}

Prefixes are resolved against the current directory, as a stage file's are, and written absolute into
each probe's stage file. The base mixture (``--base-mixture``) is a stage file (its ``sources``) or a
bare list of sources.
"""

from __future__ import annotations

import dataclasses
import os
import re

from megasail.data.loader.config import SourceConfig

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RESERVED_NAMES = ("baseline", "all", "base")
BASE = "base"  # the name base sources carry in a probe's stage (base/<source>)


class ProbeSourcesError(ValueError):
    """A candidates file, base mixture or setting that cannot be probed; the message names the file and entry."""


@dataclasses.dataclass(frozen=True)
class Probe:
    """One probe: the candidates it adds to the base mixture and the stage sources that follow.

    name: its directory under the output (``baseline``, a candidate's name, ``incNN_NAME``, ``all``,
    ``GROUP_without_halfK``). candidates: candidate names trained with the base, in order. without:
    for halving, the sources of a group left out. sources: the stage's sources as dicts (prefix, weight,
    name), weights summing to 1. trains: False only for a baseline without base mixture (the initial
    checkpoint evaluated as it is).
    """

    name: str
    kind: str  # baseline | quality | incremental | halving
    candidates: tuple[str, ...]
    sources: tuple[dict, ...]
    trains: bool = True
    without: tuple[str, ...] = ()
    group: str | None = None
    half: int | None = None


def _source(entry, where: str) -> SourceConfig:
    """One source entry through the stage schema: unknown keys and wrong types are refused."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(entry, dict):
        raise ProbeSourcesError(f"{where}: expected {{prefix: PATH, weight: W}}, got {entry!r}")
    try:
        source = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SourceConfig), entry))
    except OmegaConfBaseException as e:
        raise ProbeSourcesError(f"{where}: {str(e).splitlines()[0]} (keys: prefix, weight, name)") from None
    if source.prefix in ("", "???"):
        raise ProbeSourcesError(f"{where}: no prefix")
    if not source.weight > 0:
        raise ProbeSourcesError(f"{where}: weight must be > 0, got {source.weight}")
    source.prefix = os.path.abspath(source.prefix)
    manifest = source.prefix + ".manifest.json"
    if not os.path.isfile(manifest):
        raise ProbeSourcesError(
            f"{where}: no dataset at {source.prefix} ({manifest} missing; tools/preprocess_data.py writes it)"
        )
    return source


def _load_yaml(path: str):
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ProbeSourcesError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ProbeSourcesError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None


def read_candidates(path: str) -> dict[str, list[SourceConfig]]:
    """Candidate name -> its sources, in file order (the order incremental mode adds them)."""
    data = _load_yaml(path)
    if not isinstance(data, dict) or not data:
        raise ProbeSourcesError(
            f"{path}: expected a mapping of candidate names to sources, e.g. 'good: {{prefix: data/good}}'"
        )
    candidates: dict[str, list[SourceConfig]] = {}
    for name, entries in data.items():
        name = str(name)
        if not NAME_PATTERN.match(name) or name in RESERVED_NAMES:
            raise ProbeSourcesError(
                f"{path}: candidate name {name!r} must be letters, digits, '_', '.', '-' (a directory "
                f"name) and not one of {', '.join(RESERVED_NAMES)}"
            )
        entries = entries if isinstance(entries, list) else [entries]
        if not entries:
            raise ProbeSourcesError(f"{path}: candidate {name!r} has no sources")
        candidates[name] = [_source(e, f"{path}: candidate {name!r} source {i}") for i, e in enumerate(entries)]
    return candidates


def read_base_mixture(path: str) -> list[SourceConfig]:
    """The base mixture's sources: a stage file's ``sources`` or a list of sources."""
    data = _load_yaml(path)
    entries = data.get("sources") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ProbeSourcesError(f"{path}: expected a stage file with 'sources:' or a list of sources")
    return [_source(e, f"{path}: source {i}") for i, e in enumerate(entries)]


def _entry(source: SourceConfig, weight: float, owner: str) -> dict:
    return {"prefix": source.prefix, "weight": weight, "name": f"{owner}/{source.display_name}"}


def mixture(
    base: list[SourceConfig] | None,
    candidates: dict[str, list[SourceConfig]],
    chosen: list[str],
    mix: float,
    without: frozenset[str] = frozenset(),
) -> tuple[dict, ...]:
    """The stage sources of base + chosen candidates, weights summing to 1.

    Within the base and within the chosen candidates the given weights keep their ratios; the chosen
    candidates together get ``mix`` of the samples and the base ``1 - mix`` (all of them when one side is
    empty). without: source prefixes left out (halving), before normalising.
    """
    picked = [(name, s) for name in chosen for s in candidates[name] if s.prefix not in without]
    base = base or []
    cand_total = sum(s.weight for _, s in picked)
    base_total = sum(s.weight for s in base)
    if not picked and not base:
        raise ProbeSourcesError("a probe with neither base mixture nor candidate sources")
    cand_share = 1.0 if not base else (0.0 if not picked else mix)
    out = [_entry(s, (1.0 - cand_share) * s.weight / base_total, BASE) for s in base]
    out += [_entry(s, cand_share * s.weight / cand_total, name) for name, s in picked]
    return tuple(out)


def halves(sources: list[SourceConfig]) -> tuple[list[SourceConfig], list[SourceConfig]]:
    """A group split in file order: the first half (rounded down) and the rest."""
    cut = len(sources) // 2
    return sources[:cut], sources[cut:]


def stage_dict(probe: Probe, budget_samples: int, init: str, trainable: list[str]) -> dict:
    """The one-stage curriculum a probe trains (a stage file's keys)."""
    return {
        "name": f"probe_{probe.name}",
        "budget_samples": int(budget_samples),
        "trainable": list(trainable),
        "init_checkpoint": init,
        "sources": [dict(s) for s in probe.sources],
    }


def describe_sources(sources: tuple[dict, ...] | list[dict]) -> str:
    """'base 0.50 + good 0.50': each owner's share of the samples."""
    shares: dict[str, float] = {}
    for s in sources:
        owner = s["name"].split("/", 1)[0]
        shares[owner] = shares.get(owner, 0.0) + s["weight"]
    return " + ".join(f"{owner} {share:.2f}" for owner, share in shares.items())
