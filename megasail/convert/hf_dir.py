"""HuggingFace InternVL directories, streamed: read megasail tensors out of one, write one from them.

``HFSource`` opens a directory (config.json + safetensors in any of the three key layouts), checks
every key before any tensor is read (an unknown key names the closest known one; a missing one
names the megasail tensor that needs it) and makes megasail tensors one at a time.
``write_hf_directory`` writes config.json, generation_config.json, safetensors shards + index and
the tokenizer and processor files (``hf_processor``) from megasail tensors produced one at a time.
JSON is read as data: no ``auto_map`` code is imported or run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import torch

from megasail.convert import safetensors_io as st
from megasail.convert.hf_internvl import model_config_from_hf, model_config_from_remote_code
from megasail.convert.hf_processor import write_processor_files
from megasail.convert.recipes import (
    Recipe,
    closest,
    detect_layout,
    file_key,
    hf_file_plan,
    recipes,
    unused_vit_layer,
)
from megasail.data.images.tiling import DEFAULT_MAX_TILES
from megasail.data.text.tokenizer import MultimodalTokenizer
from megasail.inference.prompt import PromptSettings
from megasail.inference.prompt import stop_token_ids as stop_token_ids_of
from megasail.models.config import ModelConfig
from megasail.models.mcore_config import PRECISION_DTYPES

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


class MissingConfigError(FileNotFoundError):
    """A HuggingFace directory without its config.json (the message is one line naming the file)."""


def require_hf_directory(directory: str) -> str:
    """``directory``/config.json, or MissingConfigError saying what is missing (one line)."""
    path = os.path.join(directory, "config.json")
    if os.path.isfile(path):
        return path
    if not os.path.isdir(directory):
        raise MissingConfigError(f"{directory}: no such directory")
    weights = sorted(n for n in os.listdir(directory) if n.endswith(_WEIGHT_SUFFIXES))
    held = f" (it holds {', '.join(weights[:3])}{' ...' if len(weights) > 3 else ''})" if weights else ""
    raise MissingConfigError(
        f"{path} not found{held}: a HuggingFace model directory needs the config.json its weights were "
        "saved with; copy it from the source model"
    )


def read_hf_config(directory: str, precision: str | None = None, **overrides) -> tuple[ModelConfig, dict]:
    """(ModelConfig, raw config.json) of a HF InternVL (transformers) or InternVL-chat (remote code) dir;
    ``precision`` None: the dtype config.json declares."""
    path = require_hf_directory(directory)
    with open(path) as f:
        raw = json.load(f)
    overrides["precision"] = precision or hf_dtype(raw)
    make = model_config_from_remote_code if "llm_config" in raw else model_config_from_hf
    try:
        return make(raw, **overrides), raw
    except KeyError as e:
        raise ValueError(f"{path}: missing field {e} for an InternVL config") from None


def hf_dtype(raw: dict) -> str:
    """bf16 / fp16 / fp32 as the checkpoint's config.json declares it (bf16 when it does not)."""
    text = (
        raw.get("torch_dtype")
        or raw.get("dtype")
        or raw.get("text_config", raw.get("llm_config", {})).get("torch_dtype")
        or "bfloat16"
    )
    by_name = {str(dtype).replace("torch.", ""): precision for precision, dtype in PRECISION_DTYPES.items()}
    return by_name.get(str(text).replace("torch.", ""), "bf16")


class HFSource:
    """megasail tensors out of a HF directory, read tensor by tensor (``tensor(recipe)``)."""

    def __init__(self, directory: str, config: ModelConfig, allow_pickle: bool = False):
        self.directory = directory
        self.config = config
        self.entries = st.index_directory(directory, allow_pickle)
        self.pickled = st.load_pickled(directory) if not self.entries else None
        keys = list(self.entries) if self.entries else list(self.pickled)
        self.layout = detect_layout(keys)
        self.recipes = recipes(config)
        self._cache: tuple[str, torch.Tensor] | None = None
        self._check_keys(set(keys))

    def _check_keys(self, present: set[str]) -> None:
        needed: dict[str, str] = {}
        for recipe in self.recipes:
            for name in recipe.hf:
                needed[file_key(name, self.layout)[0]] = recipe.megasail
        tied = file_key("lm_head.weight", self.layout)[0]
        for key in sorted(present - set(needed)):
            if unused_vit_layer(key, self.config) or key == tied:
                continue
            raise KeyError(
                f"{self.directory}: unknown tensor '{key}' (closest known: '{closest(key, needed)}'); "
                "is this an InternVL / SAIL-VL checkpoint matching its config.json?"
            )
        for key, megasail in needed.items():
            if key not in present:
                raise KeyError(
                    f"{self.directory}: tensor '{key}' is missing (needed for megasail '{megasail}'; "
                    f"closest present: '{closest(key, present)}')"
                )

    def _read(self, key: str) -> torch.Tensor:
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        tensor = st.read_tensor(self.entries[key]) if self.entries else self.pickled[key]
        self._cache = (key, tensor)
        return tensor

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape if self.entries else tuple(self.pickled[key].shape)

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Compare every HF tensor's header shape with what the model (``shapes``: megasail TP=1
        name -> shape) needs of it, before anything is read or written."""
        for recipe in self.recipes:
            for name, want in zip(recipe.hf, recipe.part_shapes(shapes[recipe.megasail]), strict=True):
                key, block = file_key(name, self.layout)
                have = self.shape(key)
                if block is not None:
                    have = (have[0] // 3, *have[1:])
                if tuple(have) != tuple(want):
                    where = "" if block is None else f" (row block {block} of 3)"
                    raise ValueError(
                        f"{self.directory}: tensor '{key}'{where} has shape {tuple(have)} in the checkpoint but "
                        f"the config needs {tuple(want)} (megasail '{recipe.megasail}')"
                    )

    def tensor(self, recipe: Recipe, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The megasail tensor of ``recipe`` (call ``check_shapes`` once first)."""
        parts = []
        for name in recipe.hf:
            key, block = file_key(name, self.layout)
            tensor = self._read(key)
            parts.append(tensor.chunk(3, dim=0)[block] if block is not None else tensor)
        out = recipe.fuse(parts)
        return out.to(dtype) if dtype is not None else out


# --- writing -------------------------------------------------------------------------------------


def transformers_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json of ``InternVLForConditionalGeneration`` for this model (ViT cut at select_layer)."""
    from transformers import InternVLConfig

    vit, lm = config.vision, config.language
    cfg = InternVLConfig(
        vision_config=dict(
            hidden_size=vit.hidden_size,
            num_hidden_layers=vit.num_layers_used,
            num_attention_heads=vit.num_attention_heads,
            intermediate_size=vit.ffn_hidden_size,
            image_size=vit.image_size,
            patch_size=vit.patch_size,
            num_channels=vit.num_channels,
            attention_bias=vit.qkv_bias,
            layer_norm_eps=vit.layernorm_epsilon,
            layer_scale_init_value=vit.initializer_factor,
            use_mean_pooling=True,
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=lm.hidden_size,
            num_hidden_layers=lm.num_layers,
            num_attention_heads=lm.num_attention_heads,
            num_key_value_heads=lm.num_query_groups,
            intermediate_size=lm.ffn_hidden_size,
            vocab_size=lm.vocab_size,
            rms_norm_eps=lm.layernorm_epsilon,
            max_position_embeddings=lm.max_position_embeddings,
            rope_parameters={"rope_theta": float(lm.rotary_base), "rope_type": "default"},
            tie_word_embeddings=not lm.untie_embeddings_and_output_weights,
        ),
        image_token_id=config.image_token_id,
        downsample_ratio=config.projector.downsample_ratio,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=not lm.untie_embeddings_and_output_weights,
        image_seq_length=config.tokens_per_tile,
    )
    cfg.architectures = ["InternVLForConditionalGeneration"]
    if config.projector.ps_version != "v2":
        raise ValueError(
            "transformers' InternVL implements pixel shuffle v2 only: export ps_version v1 with "
            "--layout remote-code"
        )
    out = cfg.to_dict()
    out["dtype"] = str(dtype).replace("torch.", "")
    return out


def remote_code_config(
    config: ModelConfig,
    dtype: torch.dtype,
    template: str = "sailvl-chat",
    max_tiles: int = DEFAULT_MAX_TILES,
    min_tiles: int = 1,
) -> dict:
    """config.json in InternVL-chat / SAIL-VL form (``model_type: internvl_chat``). No ``auto_map``:
    the modelling code is not shipped; add the upstream remote-code files to load it that way."""
    vit, lm = config.vision, config.language
    name = str(dtype).replace("torch.", "")
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "torch_dtype": name,
        "select_layer": -1,
        "ps_version": config.projector.ps_version,
        "downsample_ratio": config.projector.downsample_ratio,
        "force_image_size": vit.image_size,
        "template": template,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "min_dynamic_patch": min_tiles,
        "max_dynamic_patch": max_tiles,
        "vision_config": {
            "model_type": "intern_vit_6b",
            "architectures": ["InternVisionModel"],
            "num_hidden_layers": vit.num_layers_used,
            "hidden_size": vit.hidden_size,
            "num_attention_heads": vit.num_attention_heads,
            "intermediate_size": vit.ffn_hidden_size,
            "image_size": vit.image_size,
            "patch_size": vit.patch_size,
            "num_channels": vit.num_channels,
            "layer_norm_eps": vit.layernorm_epsilon,
            "qkv_bias": vit.qkv_bias,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "initializer_factor": vit.initializer_factor,
            "hidden_act": "gelu",
            "use_flash_attn": False,
            "torch_dtype": name,
        },
        "llm_config": {
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            "hidden_size": lm.hidden_size,
            "num_hidden_layers": lm.num_layers,
            "num_attention_heads": lm.num_attention_heads,
            "num_key_value_heads": lm.num_query_groups,
            "intermediate_size": lm.ffn_hidden_size,
            "vocab_size": lm.vocab_size,
            "rms_norm_eps": lm.layernorm_epsilon,
            "rope_theta": float(lm.rotary_base),
            "max_position_embeddings": lm.max_position_embeddings,
            "hidden_act": "silu",
            "tie_word_embeddings": not lm.untie_embeddings_and_output_weights,
            "torch_dtype": name,
        },
    }


def copy_tokenizer(tokenizer_dir: str, out_dir: str) -> list[str]:
    """Copy the tokenizer files that exist in ``tokenizer_dir`` (or a tokenizer.json / .model path)."""
    if os.path.isfile(tokenizer_dir):
        name = "tokenizer.json" if tokenizer_dir.endswith(".json") else os.path.basename(tokenizer_dir)
        shutil.copyfile(tokenizer_dir, os.path.join(out_dir, name))
        return [name]
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
    if "tokenizer.json" not in copied and not any(n.endswith(".model") for n in os.listdir(tokenizer_dir)):
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json to copy")
    copied += [n for n in os.listdir(tokenizer_dir) if n.endswith(".model")]
    for name in copied:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    return copied


def write_hf_directory(
    out_dir: str,
    config: ModelConfig,
    shapes: dict[str, tuple[int, ...]],
    produce: Callable[[str], torch.Tensor],
    *,
    dtype: torch.dtype,
    layout: str = "transformers",
    max_shard_bytes: int = 5 << 30,
    tokenizer: MultimodalTokenizer | None = None,
    prompt: PromptSettings | None = None,
    progress=None,
) -> list[str]:
    """Write a HF directory from megasail tensors: ``produce(megasail_name)`` is called once per
    megasail tensor (TP=1 names, ``shapes`` gives each one's shape), in file order. With a
    ``tokenizer``, the tokenizer and processor files for ``prompt`` (template, tiling) as well."""
    prompt = prompt or PromptSettings(
        tile_size=config.vision.image_size, tokens_per_tile=config.tokens_per_tile
    )
    template, max_tiles = prompt.template, prompt.max_tiles
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer is not None:  # first: a tokenizer that does not fit the model stops before the weights
        write_processor_files(out_dir, tokenizer, prompt, config)
    by_recipe = {r.megasail: r for r in recipes(config)}
    owner: dict[str, tuple[Recipe, int]] = {}
    for recipe in by_recipe.values():
        for i, name in enumerate(recipe.hf):
            owner.setdefault(file_key(name, layout)[0], (recipe, i))
    plan = hf_file_plan(config, shapes, layout)
    cache: dict[str, list[torch.Tensor]] = {}

    def hf_tensor(key: str) -> torch.Tensor:
        recipe, i = owner[key]
        if recipe.megasail not in cache:
            cache.clear()  # one megasail tensor's parts at a time
            cache[recipe.megasail] = recipe.split(produce(recipe.megasail).to(dtype))
        parts = cache[recipe.megasail]
        if file_key(recipe.hf[i], layout)[1] is not None:  # remote-code ViT qkv: q, k, v rows fused again
            return torch.cat(parts, dim=0)
        return parts[i]

    shards = st.plan_shards(((k, s, dtype) for k, s in plan), max_shard_bytes)
    files = st.write_sharded(out_dir, shards, hf_tensor, progress=progress)
    cfg = (
        transformers_config(config, dtype)
        if layout != "remote-code"
        else remote_code_config(config, dtype, template, max_tiles, prompt.min_tiles)
    )
    if layout != "remote-code":  # read by tools/chat.py
        cfg.update(max_dynamic_patch=max_tiles, min_dynamic_patch=prompt.min_tiles, template=template)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True, default=str)
    stop_token_ids = stop_token_ids_of(tokenizer) if tokenizer is not None else ()
    generation = {
        "do_sample": False,
        "eos_token_id": list(stop_token_ids) or None,
        "pad_token_id": stop_token_ids[-1] if stop_token_ids else None,
    }
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in generation.items() if v is not None}, f, indent=2)
    return files
