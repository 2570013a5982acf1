"""Nested dataclass configs, YAML files and dotted command-line overrides.

    cfg = load_config("examples/configs/tiny.yaml", ["parallel.tensor=2", "model.language.num_layers=4"])

OmegaConf structured configs check keys and types; this module adds the closest-key hint for a
mistyped key and ``--help`` text generated from each field's ``help`` metadata.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from megasail.data.loader.config import DataConfig
from megasail.fields import doc
from megasail.models.config import ModelConfig


@dataclass
class ParallelConfig:
    """How the model is split across devices. The data-parallel size is what remains of the world."""

    tensor: int = doc("tensor-parallel size: attention heads and MLP columns split over this many ranks", 1)
    pipeline: int = doc("pipeline-parallel size: LLM layers split over stages; ViT and projector on stage 0", 1)
    virtual_pipeline: int | None = doc("virtual pipeline chunks per stage (interleaved 1F1B); null = off", None)
    context: int = doc("context-parallel size (sequence split for attention; needs Transformer Engine)", 1)
    sequence_parallel: bool = doc("shard activations along the sequence in norm/dropout regions (needs tensor > 1)", False)
    first_stage_llm_layers: int | None = doc(
        "LLM layers on pipeline stage 0 (which also runs the ViT); null = split evenly", None
    )
    distributed_optimizer: bool = doc("shard optimizer state over data-parallel ranks (ZeRO-1)", True)
    overlap_grad_reduce: bool = doc("overlap the data-parallel gradient reduce with backward", False)

    def validate(self) -> None:
        for name in ("tensor", "pipeline", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tensor > 1")
        if self.virtual_pipeline is not None and self.pipeline == 1:
            raise ValueError("parallel.virtual_pipeline needs parallel.pipeline > 1")


@dataclass
class RunConfig:
    """The whole run. Sections grow as training, data and checkpointing land."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # validated where a loader is built (needs stages)
    seed: int = doc("global seed (model init, data order)", 1234)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def _all_keys(schema: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass schema; list-of-dataclass items appear as ``name[].field``."""
    cls = schema if isinstance(schema, type) else type(schema)
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        tp = hints[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, key + "."))
        elif item is not None and dataclasses.is_dataclass(item):
            keys.extend(_all_keys(item, key + "[]."))
    return keys


def _closest_hint(bad_key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(bad_key, valid, n=1, cutoff=0.5)
    if not close:  # try matching just the last component within the same parent
        leaf = bad_key.rsplit(".", 1)[-1]
        leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
        match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        close = [leaves[match[0]]] if match else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _line_of(path: str, dotted_key: str) -> str:
    """':LINE' of the key's last component in a YAML file, or '' when it cannot be found."""
    leaf = re.escape(dotted_key.rsplit(".", 1)[-1])
    pattern = re.compile(rf"(^|[\s{{,-]){leaf}\s*:")  # block (`key:`) and flow (`{{a: 1, key: 2}}`) YAML
    try:
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if pattern.search(line.split("#", 1)[0]):
                return f":{n}"
    except OSError:
        pass
    return ""


def _merge(base: DictConfig, other: Any, source: str, schema: Any, path: str | None = None) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = str(getattr(e, "full_key", "") or "") or str(e)
        where = source + (_line_of(path, key) if path else "")
        raise ConfigError(f"{where}: unknown config key '{key}'{_closest_hint(key, _all_keys(schema))}") from None
    except ValidationError as e:
        key = str(getattr(e, "full_key", "") or "?")
        where = source + (_line_of(path, key) if path else "")
        reason = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{where}: bad value for '{key}': {reason}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, schema=RunConfig) -> Any:
    """Build a typed config: schema defaults <- YAML file <- dotted overrides (``a.b=value``)."""
    default = schema()
    cfg = OmegaConf.structured(default)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        cfg = _merge(cfg, OmegaConf.load(path), str(path), default, path=str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. parallel.tensor=2)")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'", default)
    obj = OmegaConf.to_object(cfg)
    for section in ("model", "parallel"):
        validate = getattr(getattr(obj, section, None), "validate", None)
        if validate is not None:
            try:
                validate()
            except ValueError as e:
                raise ConfigError(f"{path or 'config'}: {e}") from None
    return obj


def config_help(schema=RunConfig) -> str:
    """One line per field: dotted key, default, and its documentation."""
    lines = []

    def walk(cls, prefix: str) -> None:
        inst = cls()
        for f in dataclasses.fields(cls):
            value = getattr(inst, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")
            else:
                text = f.metadata.get("help", "")
                lines.append(f"  {prefix}{f.name}={value!r}\n      {text}")

    walk(schema, "")
    return "\n".join(lines)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (logged at start and saved with checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
