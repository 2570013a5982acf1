"""Open a checkpoint for generation: a megasail checkpoint directory or a HuggingFace InternVL one.

- megasail (``latest_checkpointed_iteration.txt`` / ``megasail.json``): the run's config comes from
  the checkpoint's metadata; weights load through ``megasail.checkpoint.load_checkpoint``
  (dist_checkpointing reshards to this run's TP/PP); the tokenizer, template and tiling come from
  the dataset manifests of the stage the checkpoint was saved in, unless given: the template is the
  one its samples were rendered with (the caption template for image-caption data only).
- HuggingFace (``config.json`` + safetensors, either key layout): converted in memory and sliced
  for this rank; the tokenizer is the directory's ``tokenizer.json`` unless given.

Call ``megasail.runtime.initialize(tp, pp)`` first.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace

import torch
from megatron.core import parallel_state

from megasail.data.images.tiling import DEFAULT_MAX_TILES
from megasail.data.text.tokenizer import MultimodalTokenizer
from megasail.inference.prompt import PromptSettings
from megasail.models.config import ModelConfig

log = logging.getLogger(__name__)
_MODES_CHUNK = 1 << 24  # segment modes scanned at a time by trained_template


@dataclass
class LoadedModel:
    model: torch.nn.Module  # this rank's SailVLModel
    config: ModelConfig
    tokenizer: MultimodalTokenizer
    prompt: PromptSettings


class CheckpointNotFoundError(FileNotFoundError):
    """``path`` is neither a HuggingFace model directory nor a megasail checkpoint (one-line message)."""


def is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def checkpoint_kind(path: str) -> str:
    """The kind of checkpoint at ``path``, "hf" or "megasail"; CheckpointNotFoundError naming what
    is missing otherwise."""
    from megasail.checkpoint import MARKER, META, latest_checkpoint
    from megasail.convert.hf_dir import require_hf_directory

    if is_hf_directory(path):
        return "hf"
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    if latest_checkpoint(path) is not None:
        return "megasail"
    require_hf_directory(path)  # weights without config.json: name the missing file
    raise CheckpointNotFoundError(
        f"{path}: neither a HuggingFace model directory (no config.json) nor a megasail checkpoint "
        f"(no {MARKER} and no iter_* directory with {META})"
    )


def _build(config: ModelConfig, tensor: int, pipeline: int):
    from megasail.config import ParallelConfig
    from megasail.models.sail_vl import SailVLModel

    parallel = ParallelConfig(tensor=tensor, pipeline=pipeline)
    model = SailVLModel(
        config,
        parallel,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model.eval()


def hf_prompt_settings(path: str, config: ModelConfig) -> PromptSettings:
    """Template and tiling a HF directory's config.json names (InternVL-chat's ``template``,
    ``max_dynamic_patch``, ``min_dynamic_patch``; sailvl-chat and DEFAULT_MAX_TILES when absent)."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    from megasail.data.text.template import TEMPLATES

    template = cfg.get("template") if cfg.get("template") in TEMPLATES else "sailvl-chat"
    return PromptSettings(
        template=template,
        max_tiles=cfg.get("max_dynamic_patch", DEFAULT_MAX_TILES),
        min_tiles=cfg.get("min_dynamic_patch", 1),
        tile_size=config.vision.image_size,
        tokens_per_tile=config.tokens_per_tile,
    )


def _stage_prefixes(run_config, stage_index: int | None) -> list[str]:
    """Dataset prefixes of the checkpoint's stage (the first stage when unknown), or data.path."""
    stages = run_config.data.stages
    if stages:
        index = stage_index if stage_index is not None and 0 <= stage_index < len(stages) else 0
        return [source.prefix for source in stages[index].sources]
    path = getattr(run_config.data, "path", None)
    return [path] if path else []


def trained_template(prefix: str, manifest: dict) -> tuple[str, str]:
    """(template name, sample kind) of the dataset ``prefix``: kind "chat" when any sample has prompt
    text (the conversation template rendered it), "caption" when the samples are image slots and
    captions only (the caption template: the prompt is the images), else "text"."""
    from megasail.data.format.codes import SegmentMode
    from megasail.data.format.reader import read_token_index, token_idx_path

    templates = manifest.get("templates", {})
    conversation = templates.get("conversation", {}).get("name", "sailvl-chat")
    try:
        modes = read_token_index(token_idx_path(prefix)).modes
    except (OSError, ValueError) as e:
        log.warning("%s: cannot read the sample modes (%s); assuming conversations", prefix, e)
        return conversation, "chat"
    has_image = False
    for start in range(0, len(modes), _MODES_CHUNK):  # one byte per segment; stops at the first prompt
        chunk = modes[start : start + _MODES_CHUNK]
        if (chunk == SegmentMode.PROMPT).any():
            return conversation, "chat"
        has_image = has_image or bool((chunk == SegmentMode.IMAGE).any())
    if has_image:
        return templates.get("caption", {}).get("name", "caption"), "caption"
    return conversation, "text"


def data_settings(run_config, stage_index: int | None = None) -> tuple[str | None, PromptSettings]:
    """(tokenizer path, prompt settings) of the data a checkpoint trained on: the dataset manifests
    of its stage ``stage_index`` (megasail.json's stage; the first when None) or of data.path.
    The template is the one those samples were rendered with (``trained_template``): the
    conversation template if any source holds conversations, the caption template if the sources
    hold image-caption samples only."""
    base = PromptSettings(
        max_tiles=run_config.data.max_tiles,
        min_tiles=run_config.data.min_tiles,
        tile_size=run_config.model.vision.image_size,  # the tiles the model was built for
        tokens_per_tile=run_config.model.tokens_per_tile,
    )
    found = []
    for prefix in _stage_prefixes(run_config, stage_index):
        if os.path.isfile(prefix + ".manifest.json"):
            with open(prefix + ".manifest.json") as f:
                manifest = json.load(f)
            found.append((prefix, manifest, *trained_template(prefix, manifest)))
    if not found:
        return None, base
    rank = {"chat": 0, "caption": 1, "text": 2}
    prefix, manifest, template, kind = min(found, key=lambda f: rank[f[3]])
    log.info("prompt template %r: the training data's (%s samples in %s)", template, kind, prefix)
    settings = replace(base, template=template, system_message=manifest.get("system_message"))
    return found[0][1].get("tokenizer", {}).get("path"), settings


def checkpoint_tokenizer(path: str) -> str | None:
    """ROOT/tokenizer of a checkpoint converted from HuggingFace (path: ROOT or one of its step dirs):
    a tokenizer.json or a sentencepiece .model there."""
    from megasail.data.text.tokenizer import TokenizerError, resolve_tokenizer_file

    for root in (path, os.path.dirname(os.path.abspath(path))):
        candidate = os.path.join(root, "tokenizer")
        if os.path.isdir(candidate):
            try:
                resolve_tokenizer_file(candidate)
            except TokenizerError:
                continue
            return candidate
    return None


def load_for_generation(
    path: str, *, tokenizer: str | None = None, precision: str | None = None, transformer_impl: str = "local"
) -> LoadedModel:
    """Build this rank's model (TP/PP from parallel_state) and load ``path`` into it."""
    tensor = parallel_state.get_tensor_model_parallel_world_size()
    pipeline = parallel_state.get_pipeline_model_parallel_world_size()
    precision = precision or ("bf16" if torch.cuda.is_available() else "fp32")
    if checkpoint_kind(path) == "hf":
        from megasail.convert.hf_internvl import load_hf_checkpoint
        from megasail.convert.sharding import load_full_state_dict

        config, full = load_hf_checkpoint(path, precision=precision, transformer_impl=transformer_impl)
        model = _build(config, tensor, pipeline)
        load_full_state_dict(model, full)
        del full
        prompt = hf_prompt_settings(path, config)
        tokenizer_path = tokenizer or path
    else:
        from megasail.checkpoint import latest_checkpoint, load_checkpoint, read_meta
        from megasail.config import load_config

        step_dir = latest_checkpoint(path) or path
        meta = read_meta(step_dir)
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(meta["config"])
            f.flush()
            run_config = load_config(
                f.name, [f"model.precision={precision}", f"model.transformer_impl={transformer_impl}"],
                retired="ignore",  # a config saved by an earlier version may hold keys since retired
            )
        config = run_config.model
        model = _build(config, tensor, pipeline)
        load_checkpoint(step_dir, [model], weights_only=True)
        manifest_tokenizer, prompt = data_settings(run_config, meta.get("stage", {}).get("index"))
        tokenizer_path = tokenizer or manifest_tokenizer or checkpoint_tokenizer(path)
        if tokenizer_path is None:
            raise ValueError(
                f"{path}: no tokenizer (none in the run's dataset manifest or ROOT/tokenizer); pass --tokenizer"
            )
    return LoadedModel(model, config, MultimodalTokenizer.load(tokenizer_path), prompt)
