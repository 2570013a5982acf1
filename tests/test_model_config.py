"""Model config: every field documented, derived numbers, validation, presets equal the YAMLs."""

from __future__ import annotations

import dataclasses
import os

import pytest

from megasail.models.config import LanguageConfig, ModelConfig, ProjectorConfig, VisionConfig
from megasail.models.presets import PRESETS, sail_vl_2b


@pytest.mark.parametrize("cls", [VisionConfig, ProjectorConfig, LanguageConfig, ModelConfig])
def test_every_field_has_help(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no doc() help line"


def test_derived_numbers():
    config = sail_vl_2b()
    assert config.vision.seq_length == 1025
    assert config.projector_input_size == 4096
    assert config.tokens_per_tile == 256
    assert config.vision.num_layers_used == 24
    assert dataclasses.replace(config.vision, select_layer=-4).num_layers_used == 21
    assert config.language.kv_channels == 128


@pytest.mark.parametrize("change, message", [
    ({"precision": "fp8"}, "precision"),
    ({"transformer_impl": "apex"}, "transformer_impl"),
    ({"fp8": "hybrid", "transformer_impl": "local"}, "Transformer Engine"),
    ({"vision": VisionConfig(select_layer=-26)}, "select_layer"),
    ({"projector": ProjectorConfig(ps_version="v3")}, "ps_version"),
    ({"language": LanguageConfig(num_attention_heads=12, num_query_groups=5)}, "num_query_groups"),
])
def test_validation_names_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(ModelConfig(), **change).validate()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_match_example_yaml(name, repo_root):
    from megasail.config import load_config

    preset = PRESETS[name]()
    preset.validate()
    path = os.path.join(repo_root, "examples/configs", f"{name}.yaml")
    assert os.path.exists(path), f"preset {name} has no example config {path}"
    assert load_config(path).model == preset


def test_overrides_reach_model_fields():
    from megasail.config import load_config

    run = load_config(None, ["model.vision.select_layer=-4", "model.projector.ps_version=v1"])
    assert run.model.vision.select_layer == -4 and run.model.vision.num_layers_used == 21
    assert run.model.projector.ps_version == "v1"
