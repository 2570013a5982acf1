"""Tensor-by-tensor mapping between HuggingFace InternVL files and megasail (TP=1) state-dict names.

A ``Recipe`` says how one megasail tensor is made from HF tensors (named as transformers'
in-memory model names them): copied, fused q/k/v (megatron's grouped rows) or SwiGLU [gate; up].
``file_key`` places an in-memory name in one of the on-disk layouts:

- ``transformers``: what ``InternVLForConditionalGeneration.save_pretrained`` writes
  (``vision_tower.``, ``multi_modal_projector.``, ``language_model.model.``, ``language_model.lm_head.``);
- ``remote-code``: InternVL-chat / SAIL-VL (``vision_model.``, ``mlp1.``, ``language_model.``; the ViT's
  q/k/v are the three row blocks of one ``attn.qkv``);
- ``in-memory``: transformers' module names (``model.vision_tower.`` ...), as ``state_dict()`` gives them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from megasail.convert.hf_internvl import _LM, _MM, _VIT, _all_pairs, _qkv_keys, fuse_qkv, split_qkv
from megasail.models.config import ModelConfig

LAYOUTS = ("transformers", "remote-code", "in-memory")


@dataclass(frozen=True)
class Recipe:
    megasail: str  # TP=1 state-dict name of the megasail model
    hf: tuple[str, ...]  # transformers in-memory names of the parts
    kind: str = "copy"  # copy | qkv | gate_up
    heads: int = 0
    groups: int = 0

    def fuse(self, parts: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == "qkv":
            return fuse_qkv(*parts, self.heads, self.groups)
        if self.kind == "gate_up":
            return torch.cat(parts, dim=0)
        return parts[0]

    def split(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self.kind == "qkv":
            return [t.contiguous() for t in split_qkv(tensor, self.heads, self.groups)]
        if self.kind == "gate_up":
            return [t.contiguous() for t in tensor.chunk(2, dim=0)]
        return [tensor]

    def part_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Shapes of the HF parts of a megasail tensor of ``shape``."""
        rows, rest = shape[0], tuple(shape[1:])
        if self.kind == "qkv":
            d = rows // (self.heads + 2 * self.groups)
            return [(self.heads * d, *rest), (self.groups * d, *rest), (self.groups * d, *rest)]
        if self.kind == "gate_up":
            return [(rows // 2, *rest)] * 2
        return [tuple(shape)]


def recipes(config: ModelConfig) -> list[Recipe]:
    """Every megasail tensor of ``config`` (the ViT layers that run, tied output layer omitted)."""
    out = [Recipe(ms, (hf,)) for hf, ms in _all_pairs(config)]
    for hf_prefix, ms_prefix, heads, groups, bias in _qkv_keys(config):
        for kind in ("weight", "bias") if bias else ("weight",):
            parts = tuple(f"{hf_prefix}{n}_proj.{kind}" for n in "qkv")
            out.append(Recipe(ms_prefix + kind, parts, "qkv", heads, groups))
    for i in range(config.language.num_layers):
        mlp = f"{_LM}.layers.{i}.mlp."
        out.append(
            Recipe(
                f"language_model.decoder.layers.{i}.mlp.linear_fc1.weight",
                (mlp + "gate_proj.weight", mlp + "up_proj.weight"),
                "gate_up",
            )
        )
    return out


_TO_SAVED = [
    (f"^{re.escape(_VIT)}\\.", "vision_tower."),
    (f"^{re.escape(_MM)}\\.", "multi_modal_projector."),
    (f"^{re.escape(_LM)}\\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]
_V = re.escape(_VIT)
_TO_REMOTE = [
    (rf"^{_V}\.embeddings\.cls_token$", "vision_model.embeddings.class_embedding"),
    (rf"^{_V}\.embeddings\.position_embeddings$", "vision_model.embeddings.position_embedding"),
    (rf"^{_V}\.embeddings\.patch_embeddings\.projection\.", "vision_model.embeddings.patch_embedding."),
    (
        rf"^{_V}\.encoder\.layer\.(\d+)\.attention\.projection_layer\.",
        r"vision_model.encoder.layers.\1.attn.proj.",
    ),
    (rf"^{_V}\.encoder\.layer\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (rf"^{_V}\.encoder\.layer\.(\d+)\.layernorm_before\.", r"vision_model.encoder.layers.\1.norm1."),
    (rf"^{_V}\.encoder\.layer\.(\d+)\.layernorm_after\.", r"vision_model.encoder.layers.\1.norm2."),
    (rf"^{_V}\.encoder\.layer\.(\d+)\.lambda_1$", r"vision_model.encoder.layers.\1.ls1"),
    (rf"^{_V}\.encoder\.layer\.(\d+)\.lambda_2$", r"vision_model.encoder.layers.\1.ls2"),
    (rf"^{re.escape(_MM)}\.layer_norm\.", "mlp1.0."),
    (rf"^{re.escape(_MM)}\.linear_1\.", "mlp1.1."),
    (rf"^{re.escape(_MM)}\.linear_2\.", "mlp1.3."),
    (rf"^{re.escape(_LM)}\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]
_VIT_QKV = re.compile(rf"^{_V}\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")


def file_key(name: str, layout: str) -> tuple[str, int | None]:
    """(key in the files, row block of a fused ``attn.qkv`` or None) of an in-memory HF name."""
    if layout == "in-memory":
        return name, None
    if layout == "remote-code":
        m = _VIT_QKV.match(name)
        if m:
            return f"vision_model.encoder.layers.{m[1]}.attn.qkv.{m[3]}", "qkv".index(m[2])
        table = _TO_REMOTE
    elif layout == "transformers":
        table = _TO_SAVED
    else:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    for pattern, replacement in table:
        key, n = re.subn(pattern, replacement, name)
        if n:
            return key, None
    raise KeyError(f"no {layout} name for '{name}'")


def detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith(("vision_model.", "mlp1.")) for k in keys):
        return "remote-code"
    if any(k.startswith(("vision_tower.", "multi_modal_projector.", "language_model.model.")) for k in keys):
        return "transformers"
    if any(k.startswith("model.") for k in keys):
        return "in-memory"
    raise ValueError(f"cannot tell the InternVL layout from keys such as {keys[:3]}")


def closest(key: str, known: Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.0)
    return match[0] if match else "(none)"


def unused_vit_layer(key: str, config: ModelConfig) -> bool:
    """A ViT layer after select_layer (in any layout): not part of the megasail model."""
    m = re.search(r"(?:vision_tower|vision_model)\.encoder\.(?:layer|layers)\.(\d+)\.", key)
    return bool(m) and int(m[1]) >= config.vision.num_layers_used


def hf_file_plan(
    config: ModelConfig, shapes: dict[str, tuple[int, ...]], layout: str
) -> list[tuple[str, tuple]]:
    """(file key, shape) of every HF tensor, in recipe order, for megasail ``shapes`` (TP=1 names);
    a fused remote-code ``attn.qkv`` appears once with its full shape."""
    out, seen = [], set()
    for recipe in recipes(config):
        for name, shape in zip(recipe.hf, recipe.part_shapes(shapes[recipe.megasail]), strict=True):
            key, block = file_key(name, layout)
            if key in seen:
                continue
            seen.add(key)
            out.append((key, (shape[0] * 3, *shape[1:]) if block is not None else shape))
    return out
