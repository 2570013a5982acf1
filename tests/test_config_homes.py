"""Each value has one home: retired keys are refused with what to set instead, derived keys follow their
source all the way to what the loader hands the model, and the tile budget has one default."""

import json

import pytest
from fixtures.multimodal_data import image_bytes

from megasail.config import ConfigError, RunConfig, config_help, load_config, to_yaml
from megasail.data.format.writer import ShardWriter
from megasail.data.loader.data_loader import MultimodalDataLoader

IMAGE_IDS = {"img_start": 251, "img_end": 252, "img_context": 250}


def test_tile_size_in_a_file_names_the_line_and_the_key_to_set(tmp_path):
    """Fault caught: the retired-key check skipped for files (OmegaConf then accepts data.tile_size)."""
    bad = tmp_path / "run.yaml"
    bad.write_text("model:\n  vision:\n    image_size: 448\ndata:\n  seq_length: 1024\n  tile_size: 224\n")
    with pytest.raises(ConfigError, match=r"run.yaml:6: 'data.tile_size' is no longer a config key.*"
                                          r"set model.vision.image_size"):
        load_config(bad)


def test_tile_size_override_names_the_key_to_set(repo_root):
    """Fault caught: the retired-key check skipped for overrides."""
    with pytest.raises(ConfigError, match=r"override 'data.tile_size=224'.*set model.vision.image_size"):
        load_config(f"{repo_root}/examples/configs/tiny.yaml", ["data.tile_size=224"])


def test_cost_model_is_refused_with_why(repo_root):
    """Fault caught: data.cost_model left in RETIRED_KEYS' blind spot (a plain unknown-key error without the why)."""
    with pytest.raises(ConfigError, match=r"'data.cost_model' is no longer a config key.*own model config"):
        load_config(f"{repo_root}/examples/configs/tiny.yaml", ["data.cost_model=tiny"])


def test_a_config_saved_by_an_earlier_version_still_loads(tmp_path):
    """A checkpoint's saved config may hold the retired keys: retired="ignore" drops them, and the
    derived tile size still follows the model.

    Fault caught: retired="ignore" raising like "error" (old checkpoints could not be chatted with)."""
    saved = tmp_path / "saved.yaml"
    saved.write_text("model:\n  vision:\n    image_size: 224\ndata:\n  tile_size: 448\n  cost_model: sail_vl_2b\n")
    cfg = load_config(saved, retired="ignore")
    assert cfg.data.tile_size == 224


def test_derived_keys_are_neither_written_nor_listed():
    """A saved config reloads under the default (strict) rule, and --help does not offer data.tile_size.

    Fault caught: to_yaml writing data.tile_size (the run's own checkpoint config would be refused)."""
    text = to_yaml(RunConfig())
    assert "tile_size" not in text and "cost_model" not in text
    assert "data.tile_size" not in config_help() and "data.max_tiles" in config_help()


def _one_image_prefix(prefix) -> str:
    """One sample: a prompt, a 64x48 JPEG (one tile at any budget), a target."""
    with ShardWriter(str(prefix)) as writer:
        writer.add_sample([5, 6, 0, 7, 8, 9], [2, 1, 3], [0, 2, 1], [image_bytes("JPEG", 64, 48)], [64], [48],
                          source_id=0)
    with open(f"{prefix}.manifest.json", "w") as f:
        json.dump({"format_version": 1, "image_token_ids": IMAGE_IDS}, f)
    return str(prefix)


def test_loader_tiles_at_the_models_image_size(repo_root, tmp_path):
    """model.vision.image_size set once reaches the pixels the loader hands the model: 896px tiles with
    patch 28 (still 256 tokens a tile), never the 448 default.

    Fault caught: RunConfig deriving data.tile_size from the default ModelConfig instead of its own model
    (the batch's tiles were 448x448)."""
    prefix = _one_image_prefix(tmp_path / "one")
    cfg = load_config(f"{repo_root}/examples/configs/tiny.yaml", [
        f"data.path={prefix}", "model.vision.image_size=896", "model.vision.patch_size=28", "data.seq_length=512",
        "data.global_batch_size=1", "data.micro_batch_size=1", "data.num_workers=0", "data.decode_backend=pil",
        "data.max_tiles=1", "data.pack_chunk_samples=4", "data.pack_window=2", "data.pad_token_id=0",
    ])
    from megasail.training.checks import resolve_stages

    resolve_stages(cfg)  # data.path -> one stage, as pretrain() does
    batch = next(iter(MultimodalDataLoader(cfg.data)))
    side = cfg.model.vision.image_size
    assert batch["pixel_values"].shape[1:] == (3, side, side) == (3, 896, 896)


def test_one_tile_budget_default_everywhere():
    """Preprocessing counts a sample's tokens at the budget training expands it at, and inference and the
    HF export tile as training did: one default, InternVL's load_image(max_num=12).

    Fault caught: the preprocessing default set back to 12 while training's is 10 (and vice versa)."""
    import inspect

    from megasail.convert.hf_dir import remote_code_config
    from megasail.data.loader.config import DataConfig
    from megasail.data.preprocess.config import PreprocessConfig
    from megasail.inference.prompt import PromptSettings

    export_default = inspect.signature(remote_code_config).parameters["max_tiles"].default
    budgets = {DataConfig().max_tiles, PreprocessConfig.max_tiles, PromptSettings().max_tiles, export_default}
    assert budgets == {12}
