"""Data configuration: sources and their weights, curriculum stages, and how batches are built.

    data:
      seq_length: 8192
      global_batch_size: 256
      stages:
        - name: pretrain_alignment
          budget_tokens: 131_000_000_000
          trainable: [projector]
          sources:
            - {prefix: /data/sail_caption_00, weight: 3.0}
            - {prefix: /data/ocr_00, weight: 1.0}

Every field carries a one-line doc (`megasail.fields.doc`) that `--help` prints. SAIL-VL's
curriculum ships as one YAML file per stage (examples/configs/stages/); `load_stages` reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megasail.data.images.formats import DEFAULT_MAX_IMAGE_PIXELS
from megasail.data.images.tiling import DEFAULT_MAX_TILES, TILE_SIZE
from megasail.fields import doc

TRAINABLE_MODULES = ("vision", "projector", "language")  # what a stage may train
DECODE_BACKENDS = ("auto", "pil", "dali")
WORKER_STARTS = ("auto", "fork", "spawn", "forkserver")  # multiprocessing start methods of loader workers


@dataclass
class SourceConfig:
    """One dataset prefix (written by tools/preprocess_data.py) and its share of a stage."""

    prefix: str = doc("dataset prefix: PREFIX.bin/.idx/.img.bin/.img.idx/.manifest.json", "???")
    weight: float = doc("relative share of samples drawn from this source (normalised over the stage)", 1.0)
    name: str | None = doc("name in logs and statistics; null = the prefix's file name", None)

    @property
    def display_name(self) -> str:
        return self.name or self.prefix.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class StageConfig:
    """One curriculum stage: its data mixture, how long it lasts, and which modules it trains."""

    name: str = doc("stage name (pretrain_alignment, sft_knowledge, ...)", "???")
    sources: list[SourceConfig] = doc("datasets of this stage with their weights", [])
    budget_tokens: int | None = doc(
        "stage ends with the sample whose tokens reach this many sample tokens (its last global batch padded); null = no token budget",
        None,
    )
    budget_samples: int | None = doc(
        "stage ends after exactly this many samples (its last global batch padded); null = no sample budget", None
    )
    trainable: list[str] = doc("modules trained in this stage: any of vision, projector, language", [])
    lr: float | None = doc("peak learning rate of this stage's schedule; null = optim.lr", None)
    min_lr: float | None = doc("learning rate at the end of this stage's decay; null = optim.min_lr", None)
    warmup_steps: int | None = doc("warmup of this stage's schedule in optimizer steps; null = optim's warmup", None)
    init_checkpoint: str | None = doc(
        "start this stage from another run's checkpoint, weights only (fresh optimizer and schedule); null = "
        "continue from the previous stage's weights", None
    )
    validation_sources: list[SourceConfig] = doc(
        "held-out prefixes whose loss is reported every train.eval_interval steps (blended by weight like "
        "sources); empty = no validation for this stage", []
    )

    def validate(self) -> None:
        if not self.sources:
            raise ValueError(f"data stage {self.name!r} has no sources")
        _validate_sources(self.name, "sources", self.sources)
        if self.validation_sources:
            _validate_sources(self.name, "validation_sources", self.validation_sources)
        unknown = [m for m in self.trainable if m not in TRAINABLE_MODULES]
        if unknown:
            raise ValueError(
                f"data stage {self.name!r}: unknown trainable modules {unknown}; choose from {TRAINABLE_MODULES}"
            )
        for budget in ("budget_tokens", "budget_samples"):
            value = getattr(self, budget)
            if value is not None and value < 1:
                raise ValueError(f"data stage {self.name!r}: {budget} must be >= 1 or null, got {value}")


def _validate_sources(stage: str, key: str, sources: list[SourceConfig]) -> None:
    for source in sources:
        if source.prefix in ("", "???"):
            raise ValueError(f"data stage {stage!r}: an entry of {key} has no prefix")
        if not source.weight >= 0:
            raise ValueError(f"data stage {stage!r}: {key} entry {source.prefix!r} has negative weight")
    if not any(s.weight > 0 for s in sources):
        raise ValueError(f"data stage {stage!r}: all weights of {key} are zero")


@dataclass
class DataConfig:
    """How training data is read, packed, balanced over data-parallel ranks and decoded."""

    stages: list[StageConfig] = doc("curriculum stages, run in order; the last one without budget runs forever", [])
    path: str | None = doc(
        "one dataset prefix trained as a single stage (all modules, no budget) instead of data.stages", None
    )
    seq_length: int = doc("token slots of every packed sequence (samples are never split)", 8192)
    micro_batch_size: int = doc("packed sequences per micro-batch on one data-parallel rank", 1)
    global_batch_size: int = doc("packed sequences per optimizer step over all data-parallel ranks", 8)
    seed: int = doc("data order seed: blend, per-epoch shuffles and packing derive from it", 1234)
    max_tiles: int = doc(
        "most tiles per image (InternVL dynamic tiling); keep it at the preprocessing's --max-tiles", DEFAULT_MAX_TILES
    )
    min_tiles: int = doc("fewest tiles per image", 1)
    tile_size: int = doc(
        "tile side in pixels; derived from model.vision.image_size in a run config (not a config key)", TILE_SIZE
    )
    pad_token_id: int = doc("id used for padding and for labels without loss (Qwen2.5 <|endoftext|>)", 151643)
    pack_window: int = doc("samples sorted together before best-fit packing (larger fills better)", 1024)
    pack_chunk_samples: int = doc(
        "blended samples packed as one unit; the resumable position is (chunk, pack), so resuming costs one chunk",
        65536,
    )
    balance_dp: bool = doc("assign each global batch's sequences to DP ranks by estimated cost (LPT)", True)
    num_workers: int = doc("background processes that read, decode and collate micro-batches (0 = in-process)", 2)
    prefetch_factor: int = doc("micro-batches each worker prepares ahead", 2)
    decode_backend: str = doc("image decoder: auto (per image by size), pil or dali", "auto")
    max_image_pixels: int = doc(
        "images whose header declares more pixels are refused (decompression bombs)", DEFAULT_MAX_IMAGE_PIXELS
    )
    replacement_tries: int = doc(
        "samples after a bad one (same source) tried as its replacement before the space becomes padding", 32
    )
    worker_start: str = doc(
        "how loader workers start: auto (spawn where a GPU decodes, so each worker owns a DALI GPU pipeline; "
        "else fork), fork, spawn or forkserver",
        "auto",
    )

    def validate(self) -> None:
        if not self.stages:
            raise ValueError("data.stages is empty: give at least one stage with sources")
        for stage in self.stages:
            stage.validate()
        for stage in self.stages[:-1]:
            if stage.budget_tokens is None and stage.budget_samples is None:
                raise ValueError(f"data stage {stage.name!r} has no budget but is not the last stage")
        for name in ("seq_length", "micro_batch_size", "global_batch_size", "max_tiles", "pack_window",
                     "pack_chunk_samples", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_backend not in DECODE_BACKENDS:
            raise ValueError(f"data.decode_backend must be one of {DECODE_BACKENDS}, got {self.decode_backend!r}")
        if self.worker_start not in WORKER_STARTS:
            raise ValueError(f"data.worker_start must be one of {WORKER_STARTS}, got {self.worker_start!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"data.global_batch_size {self.global_batch_size} is not a multiple of "
                f"micro_batch_size {self.micro_batch_size}"
            )

    def check_data_parallel(self, dp_size: int) -> None:
        """The global batch must split into whole micro-batches on every data-parallel rank."""
        if self.global_batch_size % (self.micro_batch_size * dp_size):
            raise ValueError(
                f"data.global_batch_size {self.global_batch_size} is not divisible by "
                f"micro_batch_size {self.micro_batch_size} x data-parallel size {dp_size}"
            )


def load_stage(path: str | Path) -> StageConfig:
    """One stage from a YAML file with StageConfig's keys (unknown keys and wrong types are refused)."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(StageConfig), OmegaConf.load(path))
    stage = OmegaConf.to_object(merged)
    stage.validate()
    return stage


def load_stages(paths: Sequence[str | Path]) -> list[StageConfig]:
    """A curriculum: the stages of several YAML files, in the given order."""
    return [load_stage(p) for p in paths]
