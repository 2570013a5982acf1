"""Open a checkpoint for generation: a megasail checkpoint directory or a HuggingFace InternVL one.

- megasail (``latest_checkpointed_iteration.txt`` / ``megasail.json``): the run's config comes from
  the checkpoint's metadata; weights load through ``megasail.training.checkpoint.load_checkpoint``
  (dist_checkpointing reshards to this run's TP/PP); the tokenizer, template and tiling come from
  the first dataset manifest the run trained on, unless given.
- HuggingFace (``config.json`` + safetensors, either key layout): converted in memory and sliced
  for this rank; the tokenizer is the directory's ``tokenizer.json`` unless given.

Call ``megasail.runtime.initialize(tp, pp)`` first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import torch
from megatron.core import parallel_state

from megasail.data.text.tokenizer import MultimodalTokenizer
from megasail.inference.prompt import PromptSettings
from megasail.models.config import ModelConfig


@dataclass
class LoadedModel:
    model: torch.nn.Module  # this rank's SailVLModel
    config: ModelConfig
    tokenizer: MultimodalTokenizer
    prompt: PromptSettings


def is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


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


def _hf_prompt_settings(path: str, config: ModelConfig) -> PromptSettings:
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    from megasail.data.text.template import TEMPLATES

    template = cfg.get("template") if cfg.get("template") in TEMPLATES else "sailvl-chat"
    return PromptSettings(
        template=template,
        max_tiles=cfg.get("max_dynamic_patch", 10),
        min_tiles=cfg.get("min_dynamic_patch", 1),
        tile_size=config.vision.image_size,
        tokens_per_tile=config.tokens_per_tile,
    )


def _manifest_settings(run_config) -> tuple[str | None, PromptSettings]:
    """(tokenizer path, prompt settings) from the first source of the run's first data stage."""
    stages = run_config.data.stages
    prefix = (
        stages[0].sources[0].prefix
        if stages and stages[0].sources
        else getattr(run_config.data, "path", None)
    )
    base = PromptSettings(
        max_tiles=run_config.data.max_tiles,
        min_tiles=run_config.data.min_tiles,
        tile_size=run_config.model.vision.image_size,  # the tiles the model was built for
        tokens_per_tile=run_config.model.tokens_per_tile,
    )
    if not prefix or not os.path.isfile(prefix + ".manifest.json"):
        return None, base
    manifest = json.loads(open(prefix + ".manifest.json").read())
    template = manifest.get("templates", {}).get("conversation", {}).get("name", base.template)
    return manifest.get("tokenizer", {}).get("path"), replace(
        base, template=template, system_message=manifest.get("system_message")
    )


def checkpoint_tokenizer(path: str) -> str | None:
    """ROOT/tokenizer of a checkpoint converted from HuggingFace (path: ROOT or one of its step dirs)."""
    for root in (path, os.path.dirname(os.path.abspath(path))):
        if os.path.isfile(os.path.join(root, "tokenizer", "tokenizer.json")):
            return os.path.join(root, "tokenizer")
    return None


def load_for_generation(
    path: str, *, tokenizer: str | None = None, precision: str | None = None, transformer_impl: str = "local"
) -> LoadedModel:
    """Build this rank's model (TP/PP from parallel_state) and load ``path`` into it."""
    tensor = parallel_state.get_tensor_model_parallel_world_size()
    pipeline = parallel_state.get_pipeline_model_parallel_world_size()
    precision = precision or ("bf16" if torch.cuda.is_available() else "fp32")
    if is_hf_directory(path):
        from megasail.convert.hf_internvl import load_hf_checkpoint
        from megasail.convert.sharding import load_full_state_dict

        config, full = load_hf_checkpoint(path, precision=precision, transformer_impl=transformer_impl)
        model = _build(config, tensor, pipeline)
        load_full_state_dict(model, full)
        del full
        prompt = _hf_prompt_settings(path, config)
        tokenizer_path = tokenizer or path
    else:
        from megasail.config import load_config
        from megasail.training.checkpoint import latest_checkpoint, load_checkpoint, read_meta

        step_dir = latest_checkpoint(path) or path
        meta = read_meta(step_dir)
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(meta["config"])
            f.flush()
            run_config = load_config(
                f.name, [f"model.precision={precision}", f"model.transformer_impl={transformer_impl}"]
            )
        config = run_config.model
        model = _build(config, tensor, pipeline)
        load_checkpoint(step_dir, [model], weights_only=True)
        manifest_tokenizer, prompt = _manifest_settings(run_config)
        tokenizer_path = tokenizer or manifest_tokenizer or checkpoint_tokenizer(path)
        if tokenizer_path is None:
            raise ValueError(
                f"{path}: no tokenizer (none in the run's dataset manifest or ROOT/tokenizer); pass --tokenizer"
            )
    return LoadedModel(model, config, MultimodalTokenizer.load(tokenizer_path), prompt)
