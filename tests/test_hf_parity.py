"""SailVLModel against transformers' InternVLForConditionalGeneration (fp32, CPU, TP=1)."""

from __future__ import annotations

import re

import pytest
import torch
from model_utils import multimodal_batch, tiny_hf_config, tiny_hf_model, tiny_model_config

from megasail.convert.hf_internvl import fuse_qkv, hf_to_megasail, megasail_to_hf, split_qkv
from megasail.models.projector import pixel_shuffle


@pytest.fixture(scope="module", autouse=True)
def single_process_megatron():
    from megasail import runtime

    runtime.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    yield
    runtime.destroy()


def _megasail_from_hf(hf, select_layer=-1, **overrides):
    from megasail.models.sail_vl import SailVLModel

    config = tiny_model_config(select_layer, **overrides)
    model = SailVLModel(config).eval()
    model.load_state_dict(hf_to_megasail(hf.state_dict(), config), strict=True)
    return model, config


@pytest.mark.parametrize("select_layer", [-1, -4])
def test_logits_match_transformers(select_layer):
    hf = tiny_hf_model(select_layer)
    model, config = _megasail_from_hf(hf, select_layer)
    ids, positions, pixels = multimodal_batch(config, tiles_per_image=(1, 3))
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels).logits
        logits = model(ids, positions, pixels)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() < 1e-4
    # the images matter: other pixels give other logits at the text after them
    with torch.no_grad():
        other = model(ids, positions, pixels.flip(0))
    assert (other - logits).abs().max() > 1e-3


def _pixel_shuffle_v1_internvl(x, scale_factor=0.5):
    """InternVL's pixel_shuffle with ps_version='v1', statement for statement (test oracle)."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x


def test_logits_match_transformers_ps_v1():
    hf = tiny_hf_model(-1)
    hf.model.pixel_shuffle = _pixel_shuffle_v1_internvl  # transformers implements v2 only
    model, config = _megasail_from_hf(hf, -1)
    model.projector.ps_version = "v1"
    ids, positions, pixels = multimodal_batch(config, tiles_per_image=(2, 1))
    with torch.no_grad():
        diff = (model(ids, positions, pixels) - hf(input_ids=ids, pixel_values=pixels).logits).abs().max()
    assert diff < 1e-4


def test_pixel_shuffle_v2_block_order():
    x = torch.randn(2, 4, 6, 3)
    out = pixel_shuffle(x, 0.5, "v2")
    assert out.shape == (2, 2, 3, 12)
    for i in range(2):
        for j in range(3):
            block = torch.cat([x[:, 2 * i, 2 * j], x[:, 2 * i, 2 * j + 1], x[:, 2 * i + 1, 2 * j], x[:, 2 * i + 1, 2 * j + 1]], -1)
            assert torch.equal(out[:, i, j], block)
    assert torch.equal(pixel_shuffle(x, 0.5, "v1"), out.transpose(1, 2))


def test_vision_position_embedding_interpolates_like_transformers():
    hf = tiny_hf_model(-1)
    model, config = _megasail_from_hf(hf, -1)
    pixels = torch.randn(2, 3, 70, 70)  # 10x10 patch grid instead of the checkpoint's 8x8
    with torch.no_grad():
        expected = hf.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
        feats = model.vision_model(pixels)
    assert feats.shape == (2, 100, config.vision.hidden_size)
    assert (feats - expected).abs().max() < 1e-4


def test_context_token_count_mismatch_is_an_error():
    hf = tiny_hf_model(-1)
    model, config = _megasail_from_hf(hf, -1)
    ids, positions, pixels = multimodal_batch(config, tiles_per_image=(1, 3))
    with pytest.raises(ValueError, match="<IMG_CONTEXT>"):
        model(ids, positions, pixels[:3])


def test_round_trip_state_dict():
    hf = tiny_hf_model(-1)
    config = tiny_model_config(-1)
    original = hf.state_dict()
    back = megasail_to_hf(hf_to_megasail(original, config), config)
    assert set(back) == set(original)
    for key, value in original.items():
        assert torch.equal(back[key], value), key


def test_round_trip_drops_layers_after_select_layer():
    hf = tiny_hf_model(-4)
    config = tiny_model_config(-4)
    original = hf.state_dict()
    used = config.vision.num_layers_used
    assert used == config.vision.num_layers - 3
    kept = {k: v for k, v in original.items()
            if not ((m := re.search(r"vision_tower\.encoder\.layer\.(\d+)\.", k)) and int(m[1]) >= used)}
    back = megasail_to_hf(hf_to_megasail(original, config), config)
    assert set(back) == set(kept)
    assert all(torch.equal(back[k], v) for k, v in kept.items())


def _transformers_to_remote_code(state):
    """transformers InternVL names -> InternVL remote-code names (test-side inverse of the reader)."""
    out = {}
    renames = [
        (r"^model\.vision_tower\.embeddings\.cls_token$", "vision_model.embeddings.class_embedding"),
        (r"^model\.vision_tower\.embeddings\.position_embeddings$", "vision_model.embeddings.position_embedding"),
        (r"^model\.vision_tower\.embeddings\.patch_embeddings\.projection\.", "vision_model.embeddings.patch_embedding."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"vision_model.encoder.layers.\1.attn.proj."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.", r"vision_model.encoder.layers.\1.norm1."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.", r"vision_model.encoder.layers.\1.norm2."),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.lambda_1$", r"vision_model.encoder.layers.\1.ls1"),
        (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.lambda_2$", r"vision_model.encoder.layers.\1.ls2"),
        (r"^model\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
        (r"^model\.multi_modal_projector\.linear_1\.", "mlp1.1."),
        (r"^model\.multi_modal_projector\.linear_2\.", "mlp1.3."),
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
    ]
    for key, value in state.items():
        m = re.match(r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.q_proj\.(weight|bias)$", key)
        if m:
            parts = [state[key.replace("q_proj", f"{n}_proj")] for n in "qkv"]
            out[f"vision_model.encoder.layers.{m[1]}.attn.qkv.{m[2]}"] = torch.cat(parts, 0)
            continue
        if re.search(r"vision_tower\.encoder\.layer\.\d+\.attention\.[kv]_proj\.", key):
            continue
        for pattern, replacement in renames:
            new_key, n = re.subn(pattern, replacement, key)
            if n:
                out[new_key] = value
                break
        else:
            raise AssertionError(f"no remote-code name for {key}")
    return out


def test_remote_code_names_convert_the_same():
    hf = tiny_hf_model(-1)
    config = tiny_model_config(-1)
    direct = hf_to_megasail(hf.state_dict(), config)
    via_remote = hf_to_megasail(_transformers_to_remote_code(hf.state_dict()), config)
    assert set(direct) == set(via_remote)
    assert all(torch.equal(direct[k], via_remote[k]) for k in direct)


def test_qkv_grouped_layout():
    heads, groups, d = 4, 2, 3
    q = torch.arange(heads * d).float()[:, None]
    k = 100 + torch.arange(groups * d).float()[:, None]
    v = 200 + torch.arange(groups * d).float()[:, None]
    fused = fuse_qkv(q, k, v, heads, groups)
    # group 0: q heads 0-1, k head 0, v head 0; then group 1
    expected = torch.cat([q[:6], k[:3], v[:3], q[6:], k[3:], v[3:]])
    assert torch.equal(fused, expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads, groups), (q, k, v), strict=True))


def test_te_layout_round_trip():
    from megasail.convert.hf_internvl import from_te_layout, to_te_layout

    config = tiny_model_config(-1)
    local = hf_to_megasail(tiny_hf_model(-1).state_dict(), config)
    te = to_te_layout(local)
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "vision_model.decoder.layers.0.mlp.linear_fc1.layer_norm_bias" in te
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in te)
    assert "language_model.decoder.final_layernorm.weight" in te and "projector.layer_norm.weight" in te
    back = from_te_layout(te)
    assert set(back) == set(local) and all(torch.equal(back[k], local[k]) for k in local)


def test_gradients_match_transformers():
    hf = tiny_hf_model(-4)
    model, config = _megasail_from_hf(hf, -4)
    ids, positions, pixels = multimodal_batch(config, tiles_per_image=(2, 1))
    labels = ids.roll(-1, dims=1)
    logits = hf(input_ids=ids, pixel_values=pixels).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
    model(ids, positions, pixels, labels=labels).sum().backward()
    grads = megasail_to_hf({name: p.grad for name, p in model.named_parameters()}, config)
    hf_params = dict(hf.named_parameters())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, hf_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_load_hf_checkpoint_directory(tmp_path):
    from megasail.convert.hf_internvl import load_hf_checkpoint

    hf = tiny_hf_model(-4)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    config, state = load_hf_checkpoint(tmp_path, precision="fp32", transformer_impl="local")
    assert config == tiny_model_config(-4)
    direct = hf_to_megasail(hf.state_dict(), config)
    assert set(state) == set(direct) and all(torch.equal(state[k], direct[k]) for k in direct)


def test_remote_code_config():
    from megasail.convert.hf_internvl import model_config_from_remote_code

    llm = tiny_hf_config(-1).text_config.to_dict()
    llm["rope_theta"] = llm["rope_parameters"]["rope_theta"]
    remote = {
        "model_type": "internvl_chat", "select_layer": -4, "ps_version": "v2", "downsample_ratio": 0.5,
        "force_image_size": 56, "template": "sailvl-chat",
        "vision_config": {"model_type": "intern_vit_6b", "num_hidden_layers": 5, "hidden_size": 32,
                          "num_attention_heads": 4, "intermediate_size": 64, "image_size": 56, "patch_size": 7,
                          "layer_norm_eps": 1e-6, "qkv_bias": True, "initializer_factor": 1.0,
                          "norm_type": "layer_norm", "qk_normalization": False},
        "llm_config": llm,
    }
    config = model_config_from_remote_code(remote, precision="fp32", transformer_impl="local")
    expected = tiny_model_config(-4)
    expected.image_token_id = 151667  # remote-code configs do not carry it; the Qwen2.5 id
    assert config == expected


def test_tied_config_refuses_a_distinct_lm_head():
    import copy

    hf_sd = tiny_hf_model(-1).state_dict()
    tied = copy.deepcopy(tiny_model_config(-1))
    tied.language.untie_embeddings_and_output_weights = False
    with pytest.raises(ValueError, match="lm_head.weight differs from embed_tokens"):
        hf_to_megasail(dict(hf_sd), tied)
    same = dict(hf_sd)
    same["lm_head.weight"] = same["model.language_model.embed_tokens.weight"]
    converted = hf_to_megasail(same, tied)
    assert "language_model.output_layer.weight" not in converted
