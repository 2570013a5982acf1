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
    overlap_grad_reduce: bool = doc(
        "overlap the data-parallel gradient reduce with backward (and, with the distributed optimizer on a "
        "GPU, the parameter all-gather with the next forward)", False
    )

    def validate(self) -> None:
        for name in ("tensor", "pipeline", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tensor > 1")
        if self.virtual_pipeline is not None and self.pipeline == 1:
            raise ValueError("parallel.virtual_pipeline needs parallel.pipeline > 1")


RECOMPUTE = ("none", "selective", "full")
SCHEDULES = ("cosine", "wsd", "linear", "constant")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


@dataclass
class TrainConfig:
    """How long to train and how each step runs. Batch sizes are data.micro_batch_size / data.global_batch_size."""

    iters: int | None = doc(
        "stop once the run has made this many optimizer steps in all (steps before a resume count); "
        "null = train every stage's budget to its end", None
    )
    log_interval: int = doc("optimizer steps between console lines (metrics.jsonl gets every step)", 1)
    eval_interval: int = doc(
        "optimizer steps between validation losses on the current stage's validation_sources (also at each "
        "stage's last step); 0 = never", 0
    )
    eval_iters: int = doc("global batches per validation loss (the same ones at every evaluation)", 10)
    max_nan_steps: int = doc("consecutive steps with a non-finite loss or gradient before the run stops", 3)
    recompute: str = doc("activation recomputation: none, selective (attention core) or full (whole layers)", "none")
    recompute_num_layers: int = doc("with recompute=full: layers per recomputed block (megatron 'uniform')", 1)
    timeout_minutes: int = doc("collective timeout of the process group", 30)
    memory_check: bool = doc(
        "refuse at start-up a run whose estimated memory per rank (megasail.models.memory) exceeds the free "
        "GPU memory, or the available host RAM shared by the local ranks on a CPU; false skips it", True
    )

    def validate(self) -> None:
        if self.iters is not None and self.iters < 0:
            raise ValueError(f"train.iters must be >= 0 or null, got {self.iters}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"train.recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.eval_interval < 0:
            raise ValueError(f"train.eval_interval must be >= 0, got {self.eval_interval}")
        for name in ("log_interval", "max_nan_steps", "recompute_num_layers", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class OptimConfig:
    """AdamW (megatron-core's distributed optimizer) and the learning-rate schedule of every stage.

    Each curriculum stage runs its own schedule (warmup, then decay to min_lr) that ends exactly
    when the stage's token or sample budget is spent; a stage may override lr, min_lr, warmup_steps.
    """

    lr: float = doc("peak learning rate", 1e-4)
    min_lr: float = doc("learning rate at the end of each stage's decay", 0.0)
    weight_decay: float = doc("AdamW weight decay (not applied to biases and norms)", 0.01)
    adam_beta1: float = doc("Adam beta1", 0.9)
    adam_beta2: float = doc("Adam beta2", 0.95)
    adam_eps: float = doc("Adam epsilon", 1e-8)
    clip_grad: float = doc("clip the global gradient norm to this value (0 = no clipping)", 1.0)
    warmup_steps: int | None = doc("linear warmup length in optimizer steps, whatever the stage's budget unit "
                                   "(the first step runs at lr / warmup_steps); null = warmup_fraction of each "
                                   "stage", None)
    warmup_fraction: float = doc("warmup as a fraction of each stage's budget when warmup_steps is null", 0.0)
    schedule: str = doc("decay after warmup: cosine, wsd (constant then decay), linear or constant", "cosine")
    wsd_decay_fraction: float = doc("with schedule=wsd: the final fraction of each stage spent decaying", 0.1)
    wsd_decay_style: str = doc("with schedule=wsd: shape of the decay (linear, cosine, exponential, minus_sqrt)",
                               "linear")
    override_scheduler: bool = doc(
        "on resume, re-plan the current stage's schedule from this config (e.g. a longer train.iters for a "
        "stage without budget) instead of the one saved in the checkpoint (megatron's "
        "--override-opt_param-scheduler)", False
    )

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.wsd_decay_style not in WSD_DECAY_STYLES:
            raise ValueError(f"optim.wsd_decay_style must be one of {WSD_DECAY_STYLES}, got {self.wsd_decay_style!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr {self.min_lr} must lie in [0, optim.lr={self.lr}]")
        if not 0 <= self.warmup_fraction < 1 or not 0 < self.wsd_decay_fraction <= 1:
            raise ValueError("optim.warmup_fraction must lie in [0, 1) and optim.wsd_decay_fraction in (0, 1]")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0 or null, got {self.warmup_steps}")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (megatron-core dist_checkpointing, torch_dist): reshardable across TP/PP/DP
    (with optimizer_sharding=dp_reshardable, the at-scale choice, the optimizer state across DP only)."""

    save: str | None = doc("directory to save checkpoints in (iter_NNNNNNN/ + latest marker); null = never save",
                           None)
    load: str | None = doc("checkpoint directory (or one iter_* step dir) to resume from; null = start fresh", None)
    interval: int = doc("optimizer steps between saves (0 = only at the end of the run)", 0)
    keep_last: int = doc("step directories kept under checkpoint.save (older ones are deleted)", 3)
    async_save: bool = doc("write checkpoints in the background (GPU only)", False)
    weights_only: bool = doc("load only the model weights: fresh optimizer, schedule and data position", False)
    optimizer_sharding: str = doc(
        "how a save stores the distributed optimizer's state: fully_reshardable (gathered per parameter; "
        "a resume may change TP, PP, VPP and DP) or dp_reshardable (every data-parallel rank writes its "
        "own shard in parallel, nothing gathered: faster saves, less memory at scale; a resume may change "
        "the DP size but not TP/PP/VPP; the 655B recipe uses it)",
        "fully_reshardable",
    )
    overwrite: bool = doc(
        "start over in a checkpoint.save directory that holds later steps of an earlier run: its step dirs and "
        "marker are moved aside into DIR/superseded_<time>/ first (without it such a run stops at start-up)",
        False,
    )

    def validate(self) -> None:
        if self.interval < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.interval must be >= 0 and checkpoint.keep_last >= 1")
        if self.optimizer_sharding not in ("dp_reshardable", "fully_reshardable"):  # megasail.checkpoint's
            raise ValueError(
                f"checkpoint.optimizer_sharding={self.optimizer_sharding!r}: "
                "use dp_reshardable or fully_reshardable"
            )


@dataclass
class LoggingConfig:
    """Where metrics go: LOGGING_DIR/metrics.jsonl (one JSON object per step), the console, wandb."""

    dir: str | None = doc("directory for metrics.jsonl and the resolved config; null = console only", None)
    wandb: bool = doc("mirror metrics to Weights & Biases (offline when WANDB_API_KEY is unset)", True)
    wandb_project: str = doc("wandb project name", "megasail")
    wandb_run_name: str | None = doc("wandb run name; null = wandb's own", None)


@dataclass
class RunConfig:
    """The whole run: model, layout, data and curriculum, training, optimizer, checkpoints, logging."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # validated where a loader is built (needs stages)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = doc("global seed (model init, data order)", 1234)

    def __post_init__(self) -> None:
        derive_data_settings(self.data, self.model)


def derive_data_settings(data: DataConfig, model: ModelConfig) -> None:
    """Set the data keys that follow from the model (DERIVED_KEYS), so each value is set in one place."""
    data.tile_size = model.vision.image_size  # the loader tiles images at the size the ViT was built for


# keys derived from another key: never read from a config file or override, never written to one
DERIVED_KEYS = {"data.tile_size": "model.vision.image_size"}

# keys a config no longer takes, each with what to do instead
RETIRED_KEYS = {
    "data.tile_size": "the tile side is derived from model.vision.image_size: set model.vision.image_size instead",
    "data.cost_model": (
        "data-parallel balancing is priced from the run's own model config (model.*), so there is nothing to "
        "choose: remove the key"
    ),
    "data.build_attention_mask": (
        "the attention over packed samples is derived from model.transformer_impl (Transformer Engine reads "
        "cu_seqlens; local layers get the block-causal mask built on the training device): remove the key"
    ),
}
RETIRED_CHOICES = ("error", "ignore")


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
        if key in RETIRED_KEYS:
            raise ConfigError(f"{where}: '{key}' is no longer a config key: {RETIRED_KEYS[key]}") from None
        raise ConfigError(f"{where}: unknown config key '{key}'{_closest_hint(key, _all_keys(schema))}") from None
    except ValidationError as e:
        key = str(getattr(e, "full_key", "") or "?")
        where = source + (_line_of(path, key) if path else "")
        reason = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{where}: bad value for '{key}': {reason}") from None


def _dotted_keys(tree: Any, prefix: str = "") -> set[str]:
    """Every dotted key of a nested dict (lists count as leaves)."""
    keys = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}{k}"
            keys.add(key)
            keys |= _dotted_keys(v, key + ".")
    return keys


def _without_retired(tree: DictConfig, source: str, path: str | None, retired: str) -> DictConfig:
    """The file's or override's keys less RETIRED_KEYS: refused with what to set instead (retired="error"),
    or dropped (retired="ignore": configs saved by an earlier version inside checkpoints)."""
    for key in sorted(_dotted_keys(OmegaConf.to_container(tree)) & set(RETIRED_KEYS)):
        if retired == "error":
            where = source + (_line_of(path, key) if path else "")
            raise ConfigError(f"{where}: '{key}' is no longer a config key: {RETIRED_KEYS[key]}")
        parent, leaf = key.rsplit(".", 1)
        node = OmegaConf.select(tree, parent)
        if isinstance(node, DictConfig):
            node.pop(leaf)
    return tree


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, schema=RunConfig, retired: str = "error"
) -> Any:
    """Build a typed config: schema defaults <- YAML file <- dotted overrides (``a.b=value``).

    A key of RETIRED_KEYS is refused with what to set instead; retired="ignore" drops such keys
    (a config an earlier version saved in a checkpoint). DERIVED_KEYS follow from their source.
    The result's ``explicit_keys`` (frozenset of dotted keys) names the values the file or the
    overrides set, as opposed to schema defaults.
    """
    if retired not in RETIRED_CHOICES:
        raise ValueError(f"retired must be one of {RETIRED_CHOICES}, got {retired!r}")
    default = schema()
    cfg = OmegaConf.structured(default)
    layers = []  # (tree, source, path) in merge order
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        layers.append((OmegaConf.load(path), str(path), str(path)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. parallel.tensor=2)")
        layers.append((OmegaConf.from_dotlist([item]), f"override '{item}'", None))
    explicit = set()
    for tree, source, file in layers:
        tree = _without_retired(tree, source, file, retired)
        cfg = _merge(cfg, tree, source, default, path=file)
        explicit |= _dotted_keys(OmegaConf.to_container(tree))
    obj = OmegaConf.to_object(cfg)
    # which values the user chose (vs schema defaults): unset ones may be taken from the data's manifests
    obj.explicit_keys = frozenset(explicit)
    for section in ("model", "parallel", "train", "optim", "checkpoint"):
        validate = getattr(getattr(obj, section, None), "validate", None)
        if validate is not None:
            try:
                validate()
            except ValueError as e:
                raise ConfigError(f"{path or 'config'}: {e}") from None
    return obj


def config_help(schema=RunConfig) -> str:
    """One entry per field: dotted key, default, and its documentation. Items of list-of-dataclass
    fields (``data.stages``) are listed as ``data.stages[].name`` with the item class's defaults."""
    lines = []

    def walk(cls, prefix: str) -> None:
        inst = cls()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(inst, f.name)
            if f"{prefix}{f.name}" in DERIVED_KEYS:
                continue
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{f.name}.")
                continue
            text = f.metadata.get("help", "")
            lines.append(f"  {prefix}{f.name}={value!r}\n      {text}")
            tp = hints[f.name]
            item = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else None
            if item is not None and dataclasses.is_dataclass(item):
                walk(item, f"{prefix}{f.name}[].")

    walk(schema, "")
    return "\n".join(lines)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (logged at start, written to LOGGING_DIR/config.yaml, saved with
    checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain nested dicts and lists (wandb's run config), less DERIVED_KEYS."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg))
    for key in DERIVED_KEYS:
        parent, leaf = key.rsplit(".", 1)
        node = tree
        for part in parent.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return tree
