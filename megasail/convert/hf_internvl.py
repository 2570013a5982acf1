"""HuggingFace InternVL <-> megasail state dicts (unsharded, TP=1 / PP=1 layout).

Three HF layouts are read: transformers' ``InternVLForConditionalGeneration`` in memory
(``model.vision_tower``, ``model.multi_modal_projector``, ``model.language_model``, ``lm_head``), the
same model as saved on disk (``vision_tower``, ``multi_modal_projector``, ``language_model.model``,
``language_model.lm_head``) and the InternVL/SAIL-VL remote-code checkpoints (``vision_model``,
``mlp1``, ``language_model.model``); all are first renamed to the in-memory names. Writing
produces the in-memory layout.

megatron's fused layouts: ``linear_qkv`` rows are grouped per query group as [the group's q heads;
its k head; its v head] (for the ViT every head is its own group); ``linear_fc1`` of SwiGLU is
[gate; up]. ViT layers after ``select_layer`` are not part of the megasail model and are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from megasail.models.config import ModelConfig

Tensor = torch.Tensor

_VIT = "model.vision_tower"
_LM = "model.language_model"
_MM = "model.multi_modal_projector"


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_groups: int) -> Tensor:
    """Separate q [heads*d, ...], k, v [groups*d, ...] -> megatron's grouped rows [groups*(heads/groups+2)*d, ...]."""
    d = q.shape[0] // num_heads
    rest = q.shape[1:]
    q = q.reshape(num_groups, num_heads // num_groups * d, *rest)
    k = k.reshape(num_groups, d, *rest)
    v = v.reshape(num_groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, num_heads: int, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``fuse_qkv``."""
    per_group = num_heads // num_groups
    d = qkv.shape[0] // (num_groups * (per_group + 2))
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_groups, (per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


_REMOTE_RENAMES = [  # (remote-code pattern, transformers name)
    (r"^vision_model\.embeddings\.class_embedding$", f"{_VIT}.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", f"{_VIT}.embeddings.position_embeddings"),
    (r"^vision_model\.embeddings\.patch_embedding\.", f"{_VIT}.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.", _VIT + r".encoder.layer.\1.attention.projection_layer."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", _VIT + r".encoder.layer.\1.mlp."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.", _VIT + r".encoder.layer.\1.layernorm_before."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.", _VIT + r".encoder.layer.\1.layernorm_after."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", _VIT + r".encoder.layer.\1.lambda_1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", _VIT + r".encoder.layer.\1.lambda_2"),
    (r"^mlp1\.0\.", f"{_MM}.layer_norm."),
    (r"^mlp1\.1\.", f"{_MM}.linear_1."),
    (r"^mlp1\.3\.", f"{_MM}.linear_2."),
    (r"^language_model\.model\.", f"{_LM}."),
    (r"^language_model\.lm_head\.", "lm_head."),
]


def remote_code_to_transformers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an InternVL/SAIL-VL remote-code state dict to transformers' InternVL names
    (the fused ``attn.qkv`` is a plain [q; k; v] concatenation there)."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if m:
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{_VIT}.encoder.layer.{m[1]}.attention.{name}_proj.{m[2]}"] = part
            continue
        for pattern, replacement in _REMOTE_RENAMES:
            new_key, n = re.subn(pattern, replacement, key)
            if n:
                out[new_key] = value
                break
        else:
            raise KeyError(f"unexpected key in InternVL remote-code checkpoint: {key}")
    return out


_SAVED_RENAMES = [  # transformers' on-disk (``save_pretrained``, ``*-hf`` repos) names -> in-memory names
    (r"^vision_tower\.", f"{_VIT}."),
    (r"^multi_modal_projector\.", f"{_MM}."),
    (r"^language_model\.model\.", f"{_LM}."),
    (r"^language_model\.lm_head\.", "lm_head."),
]


def to_transformers_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Any of the three HF layouts (remote code, transformers on disk, transformers in memory)
    -> transformers' in-memory names (``model.vision_tower...``)."""
    if any(k.startswith(("vision_model.", "mlp1.")) for k in state):
        return remote_code_to_transformers(state)
    if any(k.startswith(("vision_tower.", "multi_modal_projector.")) for k in state):
        out = {}
        for key, value in state.items():
            for pattern, replacement in _SAVED_RENAMES:
                key, n = re.subn(pattern, replacement, key)
                if n:
                    break
            out[key] = value
        return out
    return dict(state)


def _vision_pairs(layer: int) -> list[tuple[str, str]]:
    """(transformers suffix, megasail suffix) of the ViT layer tensors that map one to one."""
    hf, ms = f"{_VIT}.encoder.layer.{layer}.", f"vision_model.decoder.layers.{layer}."
    pairs = [("attention.projection_layer", "self_attention.linear_proj"), ("layernorm_before", "input_layernorm"),
             ("layernorm_after", "pre_mlp_layernorm"), ("mlp.fc1", "mlp.linear_fc1"), ("mlp.fc2", "mlp.linear_fc2")]
    out = [(hf + a + "." + p, ms + b + "." + p) for a, b in pairs for p in ("weight", "bias")]
    return out + [(hf + "lambda_1", ms + "ls1"), (hf + "lambda_2", ms + "ls2")]


def _language_pairs(layer: int) -> list[tuple[str, str]]:
    hf, ms = f"{_LM}.layers.{layer}.", f"language_model.decoder.layers.{layer}."
    pairs = [("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
             ("input_layernorm.weight", "input_layernorm.weight"),
             ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
             ("mlp.down_proj.weight", "mlp.linear_fc2.weight")]
    return [(hf + a, ms + b) for a, b in pairs]


def _global_pairs(config: ModelConfig) -> list[tuple[str, str]]:
    pairs = [
        (f"{_VIT}.embeddings.position_embeddings", "vision_model.position_embedding"),
        (f"{_VIT}.embeddings.patch_embeddings.projection.weight", "vision_model.patch_embedding.weight"),
        (f"{_VIT}.embeddings.patch_embeddings.projection.bias", "vision_model.patch_embedding.bias"),
        (f"{_MM}.layer_norm.weight", "projector.layer_norm.weight"),
        (f"{_MM}.layer_norm.bias", "projector.layer_norm.bias"),
        (f"{_MM}.linear_1.weight", "projector.mlp.encoder.linear_fc1.weight"),
        (f"{_MM}.linear_1.bias", "projector.mlp.encoder.linear_fc1.bias"),
        (f"{_MM}.linear_2.weight", "projector.mlp.encoder.linear_fc2.weight"),
        (f"{_MM}.linear_2.bias", "projector.mlp.encoder.linear_fc2.bias"),
        (f"{_LM}.embed_tokens.weight", "language_model.embedding.word_embeddings.weight"),
        (f"{_LM}.norm.weight", "language_model.decoder.final_layernorm.weight"),
    ]
    if config.vision.class_token:
        pairs.append((f"{_VIT}.embeddings.cls_token", "vision_model.class_token"))
    if config.language.untie_embeddings_and_output_weights:
        pairs.append(("lm_head.weight", "language_model.output_layer.weight"))
    return pairs


def _qkv_keys(config: ModelConfig):
    """(hf prefix, megasail prefix, heads, groups, with bias) for every fused attention projection."""
    vit, lm = config.vision, config.language
    for i in range(vit.num_layers_used):
        yield (f"{_VIT}.encoder.layer.{i}.attention.", f"vision_model.decoder.layers.{i}.self_attention.linear_qkv.",
               vit.num_attention_heads, vit.num_attention_heads, vit.qkv_bias)
    for i in range(lm.num_layers):
        yield (f"{_LM}.layers.{i}.self_attn.", f"language_model.decoder.layers.{i}.self_attention.linear_qkv.",
               lm.num_attention_heads, lm.num_query_groups, lm.qkv_bias)


def _all_pairs(config: ModelConfig) -> list[tuple[str, str]]:
    """(HF key, megasail key) of every tensor that maps one to one (the ViT layers that run included)."""
    pairs = _global_pairs(config)
    for i in range(config.vision.num_layers_used):
        pairs += _vision_pairs(i)
    for i in range(config.language.num_layers):
        pairs += _language_pairs(i)
    return pairs


def hf_to_megasail(state: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """HF InternVL state dict (any layout ``to_transformers_names`` reads) -> megasail state dict (TP=1, PP=1).

    Every HF tensor is used except the ViT layers after ``select_layer``; anything else left
    over is an error (a layout this mapping does not know).
    """
    hf = to_transformers_names(state)
    out: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        try:
            return hf.pop(key)
        except KeyError:
            raise KeyError(f"HF checkpoint lacks '{key}' (does the config match the checkpoint?)") from None

    pairs = _all_pairs(config)
    for hf_key, ms_key in pairs:
        out[ms_key] = take(hf_key)
    for hf_prefix, ms_prefix, heads, groups, bias in _qkv_keys(config):
        for kind in ("weight", "bias") if bias else ("weight",):
            q, k, v = (take(f"{hf_prefix}{n}_proj.{kind}") for n in "qkv")
            out[ms_prefix + kind] = fuse_qkv(q, k, v, heads, groups)
    for i in range(config.language.num_layers):
        hf_mlp = f"{_LM}.layers.{i}.mlp."
        out[f"language_model.decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.cat(
            [take(hf_mlp + "gate_proj.weight"), take(hf_mlp + "up_proj.weight")], dim=0)
    if not config.language.untie_embeddings_and_output_weights:
        head = hf.pop("lm_head.weight", None)  # tied: must be the same tensor as embed_tokens
        embed = out["language_model.embedding.word_embeddings.weight"]
        if head is not None and not (head.shape == embed.shape and torch.equal(head, embed)):
            raise ValueError("config says the output layer is tied to the embeddings, but the checkpoint's "
                             "lm_head.weight differs from embed_tokens: set tie_word_embeddings=false "
                             "(model.language.untie_embeddings_and_output_weights=true)")
    unused_vit = re.compile(rf"^{re.escape(_VIT)}\.encoder\.layer\.(\d+)\.")
    leftover = [k for k in hf if not ((m := unused_vit.match(k)) and int(m[1]) >= config.vision.num_layers_used)]
    if leftover:
        raise KeyError(f"HF tensors with no megasail counterpart: {sorted(leftover)[:8]}")
    return out


def megasail_to_hf(state: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """megasail state dict (TP=1, PP=1) -> transformers' InternVL names.

    The result holds ``vision.num_layers_used`` ViT layers; export it with
    ``vision_feature_layer=-1`` and that many ``num_hidden_layers``.
    """
    ms = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    out: dict[str, Tensor] = {}
    pairs = _all_pairs(config)
    for hf_key, ms_key in pairs:
        out[hf_key] = ms.pop(ms_key)
    for hf_prefix, ms_prefix, heads, groups, bias in _qkv_keys(config):
        for kind in ("weight", "bias") if bias else ("weight",):
            for n, part in zip("qkv", split_qkv(ms.pop(ms_prefix + kind), heads, groups), strict=True):
                out[f"{hf_prefix}{n}_proj.{kind}"] = part
    for i in range(config.language.num_layers):
        gate, up = ms.pop(f"language_model.decoder.layers.{i}.mlp.linear_fc1.weight").chunk(2, dim=0)
        out[f"{_LM}.layers.{i}.mlp.gate_proj.weight"] = gate
        out[f"{_LM}.layers.{i}.mlp.up_proj.weight"] = up
    if not config.language.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = out[f"{_LM}.embed_tokens.weight"]
    if ms:
        raise KeyError(f"megasail tensors with no HF counterpart: {sorted(ms)[:8]}")
    return out


def model_config_from_hf(hf_config, **overrides) -> ModelConfig:
    """ModelConfig from a transformers ``InternVLConfig`` (object or its ``to_dict()``).

    Values that decide parity (eps, rope theta, select layer, tying) come from the checkpoint's
    config, never from defaults. ``overrides`` set ModelConfig's own fields (precision, ...).
    """
    from megasail.models.config import LanguageConfig, ProjectorConfig, VisionConfig

    cfg = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    vis, txt = dict(cfg["vision_config"]), dict(cfg["text_config"])
    pair = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731
    if vis.get("use_qk_norm") or vis.get("norm_type", "layer_norm") != "layer_norm" or not vis.get("use_mean_pooling", True):
        raise ValueError("only InternViT-300M-style vision towers (LayerNorm, no qk-norm, no final norm) are supported")
    feature_layer = cfg.get("vision_feature_layer", -1)
    if not isinstance(feature_layer, int):
        raise ValueError(f"a single vision_feature_layer is supported, got {feature_layer}")
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError("only vision_feature_select_strategy='default' (cls token dropped) is supported")
    vision = VisionConfig(
        num_layers=vis["num_hidden_layers"], hidden_size=vis["hidden_size"],
        num_attention_heads=vis["num_attention_heads"], ffn_hidden_size=vis["intermediate_size"],
        image_size=pair(vis["image_size"]), patch_size=pair(vis["patch_size"]),
        num_channels=vis.get("num_channels", 3), layernorm_epsilon=vis["layer_norm_eps"],
        qkv_bias=vis.get("attention_bias", True), initializer_factor=vis.get("layer_scale_init_value", 1.0),
        select_layer=feature_layer,
    )
    rope = txt.get("rope_parameters") or {}
    language = LanguageConfig(
        num_layers=txt["num_hidden_layers"], hidden_size=txt["hidden_size"],
        num_attention_heads=txt["num_attention_heads"], num_query_groups=txt["num_key_value_heads"],
        ffn_hidden_size=txt["intermediate_size"], vocab_size=txt["vocab_size"],
        rotary_base=int(rope.get("rope_theta", txt.get("rope_theta", 10000))),
        layernorm_epsilon=txt["rms_norm_eps"], max_position_embeddings=txt["max_position_embeddings"],
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", txt.get("tie_word_embeddings", False)),
    )
    projector = ProjectorConfig(downsample_ratio=cfg.get("downsample_ratio", 0.5))
    return ModelConfig(vision=vision, projector=projector, language=language,
                       image_token_id=cfg.get("image_token_id", 151667), **overrides)


_TE_NORMS = [  # local-spec key -> Transformer Engine key (the norm is fused into the next linear)
    (re.compile(r"\.input_layernorm\.(weight|bias)$"), r".self_attention.linear_qkv.layer_norm_\1"),
    (re.compile(r"\.pre_mlp_layernorm\.(weight|bias)$"), r".mlp.linear_fc1.layer_norm_\1"),
]


def to_te_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Local-spec megasail keys -> the keys of the same model built with Transformer Engine."""
    out = {}
    for key, value in state.items():
        for pattern, replacement in _TE_NORMS:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


def from_te_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of ``to_te_layout`` (TE's ``_extra_state`` entries, FP8 metadata, are dropped)."""
    out = {}
    for key, value in state.items():
        if key.endswith("_extra_state"):
            continue
        key = re.sub(r"\.self_attention\.linear_qkv\.layer_norm_(weight|bias)$", r".input_layernorm.\1", key)
        key = re.sub(r"\.mlp\.linear_fc1\.layer_norm_(weight|bias)$", r".pre_mlp_layernorm.\1", key)
        out[key] = value
    return out


def model_config_from_remote_code(cfg: Mapping, **overrides) -> ModelConfig:
    """ModelConfig from an InternVL/SAIL-VL remote-code ``config.json`` (``internvl_chat``:
    ``vision_config``, ``llm_config``, ``select_layer``, ``ps_version``, ``downsample_ratio``)."""
    vis, llm = cfg["vision_config"], cfg["llm_config"]
    if vis.get("model_type", "intern_vit_6b") != "intern_vit_6b" or vis.get("qk_normalization") \
            or vis.get("norm_type", "layer_norm") != "layer_norm":
        raise ValueError(f"vision tower {vis.get('model_type')!r} is not an InternViT-300M-style model")
    size = cfg.get("force_image_size") or vis["image_size"]
    transformers_style = {
        "vision_config": dict(
            num_hidden_layers=vis["num_hidden_layers"], hidden_size=vis["hidden_size"],
            num_attention_heads=vis["num_attention_heads"], intermediate_size=vis["intermediate_size"],
            image_size=size, patch_size=vis["patch_size"], layer_norm_eps=vis.get("layer_norm_eps", 1e-6),
            attention_bias=vis.get("qkv_bias", True), layer_scale_init_value=vis.get("initializer_factor", 1.0),
        ),
        "text_config": dict(llm, rope_parameters={"rope_theta": llm.get("rope_theta", 10000)}),
        "vision_feature_layer": cfg.get("select_layer", -1),
        "downsample_ratio": cfg.get("downsample_ratio", 0.5),
        "tie_word_embeddings": llm.get("tie_word_embeddings", False),
    }
    config = model_config_from_hf(transformers_style, **overrides)
    config.projector.ps_version = cfg.get("ps_version", "v1")  # InternVL's config class defaults to v1
    return config


def load_hf_checkpoint(directory, **overrides) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Read a HF InternVL checkpoint directory (``config.json`` + ``*.safetensors``; never pickles,
    never runs remote code) -> (ModelConfig, megasail state dict at TP=1/PP=1)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (pickled .bin checkpoints are not read)")
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    remote = "llm_config" in cfg
    config = model_config_from_remote_code(cfg, **overrides) if remote else model_config_from_hf(cfg, **overrides)
    return config, hf_to_megasail(state, config)
