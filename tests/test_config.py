"""Config loading: YAML + dotted overrides, refusal of unknown keys and bad types, --help coverage."""

import dataclasses

import pytest

from megasail.config import DERIVED_KEYS, ConfigError, RunConfig, config_help, load_config

CONFIGS = ["tiny", "sail_vl_2b", "sail_vl_8b"]


@pytest.mark.parametrize("name", CONFIGS)
def test_example_configs_load(repo_root, name):
    cfg = load_config(f"{repo_root}/examples/configs/{name}.yaml")
    assert isinstance(cfg, RunConfig)


def test_sail_vl_dimensions_match_the_paper(repo_root):
    c2 = load_config(f"{repo_root}/examples/configs/sail_vl_2b.yaml").model
    c8 = load_config(f"{repo_root}/examples/configs/sail_vl_8b.yaml").model
    for c in (c2, c8):  # InternViT-300M-448px in both
        v = c.vision
        assert (v.num_layers, v.hidden_size, v.num_attention_heads, v.ffn_hidden_size) == (24, 1024, 16, 4096)
        assert (v.image_size, v.patch_size) == (448, 14)
        assert c.tokens_per_tile == 256
        assert c.projector_input_size == 4096
    l2, l8 = c2.language, c8.language
    assert (l2.num_layers, l2.hidden_size, l2.num_attention_heads, l2.num_query_groups, l2.ffn_hidden_size,
            l2.vocab_size) == (28, 1536, 12, 2, 8960, 151936)
    assert (l8.num_layers, l8.hidden_size, l8.num_attention_heads, l8.num_query_groups, l8.ffn_hidden_size,
            l8.vocab_size) == (28, 3584, 28, 4, 18944, 152064)
    assert l2.rotary_base == l8.rotary_base == 1_000_000


def test_dotted_overrides_apply_and_are_typed(repo_root):
    cfg = load_config(f"{repo_root}/examples/configs/tiny.yaml",
                      ["parallel.tensor=2", "model.language.num_layers=6", "parallel.sequence_parallel=true"])
    assert cfg.parallel.tensor == 2 and cfg.model.language.num_layers == 6 and cfg.parallel.sequence_parallel is True


def test_unknown_key_names_key_and_closest(repo_root):
    with pytest.raises(ConfigError, match=r"unknown config key 'parallel.tensr'.*did you mean 'parallel.tensor'"):
        load_config(f"{repo_root}/examples/configs/tiny.yaml", ["parallel.tensr=2"])


def test_unknown_key_in_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("parallel:\n  tensor: 2\nmodel:\n  language:\n    num_layer: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:5: unknown config key 'model.language.num_layer'.*num_layers"):
        load_config(bad)


def test_bad_type_is_refused(repo_root):
    with pytest.raises(ConfigError, match="bad value for 'parallel.tensor'"):
        load_config(f"{repo_root}/examples/configs/tiny.yaml", ["parallel.tensor=two"])


def test_inconsistent_values_are_refused(repo_root):
    with pytest.raises(ConfigError, match="sequence_parallel"):
        load_config(f"{repo_root}/examples/configs/tiny.yaml", ["parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["parallel.tensor"])
    with pytest.raises(ConfigError, match="checkpoint.optimizer_sharding='zero'.*dp_reshardable"):
        load_config(f"{repo_root}/examples/configs/tiny.yaml", ["checkpoint.optimizer_sharding=zero"])


def _leaf_fields(cls, prefix=""):
    inst = cls()
    for f in dataclasses.fields(cls):
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_fields(type(value), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def test_every_config_field_is_documented_in_help():
    # the config surface grows only on purpose: a field without a help line fails here
    text = config_help()
    for key, f in _leaf_fields(RunConfig):
        assert f.metadata.get("help"), f"config field '{key}' has no help text (use megasail.fields.doc)"
        assert (f"  {key}=" in text) != (key in DERIVED_KEYS)  # derived keys are not for setting


def test_data_stages_load_from_yaml_and_typos_in_list_items_are_located(tmp_path):
    good = tmp_path / "run.yaml"
    good.write_text(
        "data:\n  seq_length: 4096\n  stages:\n"
        "    - name: align\n      budget_samples: 10\n      trainable: [projector]\n"
        "      sources:\n        - {prefix: /d/cap, weight: 2.0}\n"
        "    - name: sft\n      trainable: [vision, projector, language]\n"
        "      sources:\n        - {prefix: /d/sft, weight: 1.0}\n"
    )
    cfg = load_config(good)
    cfg.data.validate()
    assert [s.name for s in cfg.data.stages] == ["align", "sft"]
    assert cfg.data.stages[0].sources[0].weight == 2.0 and cfg.data.seq_length == 4096
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("{prefix: /d/sft, weight", "{prefix: /d/sft, weigth"))
    with pytest.raises(ConfigError, match=r"bad.yaml:12: unknown config key 'weigth'.*sources\[\]\.weight"):
        load_config(bad)


def test_resolved_config_round_trips_through_yaml(repo_root, tmp_path):
    from megasail.config import to_yaml

    cfg = load_config(f"{repo_root}/examples/configs/sail_vl_8b.yaml", ["parallel.pipeline=2", "data.seq_length=4096"])
    saved = tmp_path / "resolved.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved) == cfg
