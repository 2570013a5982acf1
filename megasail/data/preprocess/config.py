"""Settings of one preprocessing run; every field's doc line is its --help text."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from megasail.data.images.formats import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from megasail.data.images.tiling import DEFAULT_MAX_TILES


@dataclass
class PreprocessConfig:
    inputs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "input files or globs (JSONL or webdataset .tar); several allowed, processed in the order given"
        },
    )
    output_prefix: str = field(
        default="",
        metadata={
            "help": "dataset prefix to write: PREFIX.bin/.idx, PREFIX.img.bin/.img.idx, PREFIX.rejects.jsonl, "
            "PREFIX.manifest.json (written last; a prefix is complete iff it exists)"
        },
    )
    tokenizer: str = field(
        default="",
        metadata={
            "help": "tokenizer.json, a directory holding one, or a sentencepiece .model; <img>, </img>, "
            "<IMG_CONTEXT>, <|im_start|>, <|im_end|> are added when missing"
        },
    )
    input_format: str = field(
        default="auto",
        metadata={
            "help": "record format; auto detects per file (tar = webdataset) and per record (by its fields)"
        },
    )
    template: str = field(default="sailvl-chat", metadata={"help": "template for conversation records"})
    caption_template: str = field(
        default="caption",
        metadata={
            "help": "template for caption and webdataset records (a chat template renders them as one-turn chats)"
        },
    )
    system_message: str | None = field(
        default=None,
        metadata={
            "help": "system prompt for chat templates (default: the template's own); a record's system turn wins"
        },
    )
    image_root: str | None = field(
        default=None,
        metadata={
            "help": "directory image paths are relative to (default: the directory of each JSONL file)"
        },
    )
    max_seq_length: int = field(
        default=8192,
        metadata={"help": "longest sample in tokens: text + each image at --max-tiles (incl. <img>, </img>)"},
    )
    max_tiles: int = field(default=DEFAULT_MAX_TILES, metadata={"help": "tile budget per image used to count its tokens"})
    on_too_long: str = field(
        default="reject",
        metadata={
            "help": "reject over-long samples, or truncate their trailing text (an image is never cut)"
        },
    )
    max_image_pixels: int = field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metadata={"help": "reject images with more pixels (checked from the header before decoding)"},
    )
    max_image_bytes: int = field(
        default=DEFAULT_MAX_IMAGE_BYTES,
        metadata={"help": "reject image files and webdataset image members larger than this many bytes"},
    )
    max_line_bytes: int = field(default=16 << 20, metadata={"help": "reject JSONL lines longer than this"})
    workers: int = field(default=1, metadata={"help": "worker processes; output bytes do not depend on it"})
    lines_per_unit: int = field(
        default=4096,
        metadata={
            "help": "JSONL lines per work unit (one shard each; also the resume granularity); a tar is one unit"
        },
    )
    writer: str = field(
        default="auto",
        metadata={
            "help": "shard writer: cpp (native builder), python (pure-Python reference), auto (cpp when built)"
        },
    )
    fsync_units: bool = field(
        default=False,
        metadata={
            "help": "fsync every finished unit shard; by default only the merged output is fsynced, and --resume "
            "redoes the units written before a reboot (a killed run keeps them: the page cache outlives it)"
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing prefix or unfinished run"})
    resume: bool = field(
        default=False,
        metadata={
            "help": "continue an interrupted run: keep finished units, redo the rest (same settings required)"
        },
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar (only on a TTY)"})
    max_internal_errors: int = field(
        default=0,
        metadata={
            "help": "records on which megasail itself raised an unexpected exception (a bug, not bad input) "
            "tolerated before the run fails; each is reported with its traceback in "
            "PREFIX.internal_errors.jsonl, apart from the rejects"
        },
    )


CHOICES = {
    "input_format": ("auto", "conversation", "caption", "text", "webdataset"),
    "on_too_long": ("reject", "truncate"),
    "writer": ("auto", "cpp", "python"),
}


def config_help() -> dict[str, str]:
    """Field name -> help line, for the CLI and for the test that every flag is documented."""
    return {f.name: f.metadata.get("help", "") for f in fields(PreprocessConfig)}
