"""Start-up checks, the LR clock, the executed-FLOPs formula and the entry point's --help (no training)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from train_utils import REPO, TINY_YAML

from megasail.config import config_help, load_config
from megasail.data.loader.state import LoaderPosition
from megasail.training.checks import StartupError, check_run


def _manifest(prefix, context=405, vocab=410, im_end=401):
    with open(f"{prefix}.manifest.json", "w") as f:
        json.dump(
            {
                "format_version": 1,
                "image_token_ids": {"img_start": 403, "img_end": 404, "img_context": context},
                "tokenizer": {"vocab_size": vocab, "special_token_ids": {"<|im_end|>": im_end}},
            },
            f,
        )
    return str(prefix)


def _cfg(prefix, *overrides):
    return load_config(TINY_YAML, [f"data.path={prefix}", *overrides])


def test_unset_token_values_come_from_the_manifest(tmp_path):
    """tiny.yaml leaves image_token_id, vocab_size and pad_token_id unset: they are taken from the
    dataset's tokenizer, the vocabulary padded like megatron's (multiple of 128 x TP).

    Fails if the manifest is not read (the Qwen defaults 151667 / 151936 / 151643 stay)."""
    cfg = _cfg(_manifest(tmp_path / "ds"), "parallel.tensor=2")
    check_run(cfg, 2)
    assert cfg.model.image_token_id == 405
    assert cfg.model.language.vocab_size == 512  # 410 padded to a multiple of 256
    assert cfg.data.pad_token_id == 401
    assert cfg.model.packed_sequences is True  # local layers: packed samples get the block-causal mask
    assert [s.trainable for s in cfg.data.stages] == [["vision", "projector", "language"]]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.image_token_id=7"],
            r"model.image_token_id=7 but .*ds.manifest.json has <IMG_CONTEXT> = 405",
        ),
        (
            ["model.language.vocab_size=256"],
            r"vocab_size=256 is smaller than the tokenizer of .*ds \(410 tokens\)",
        ),
        (["model.packed_sequences=false"], r"packed samples would attend to each other"),
        (["parallel.tensor=3"], r"world size 2 is not divisible by parallel.tensor=3"),
        (
            ["data.global_batch_size=3"],
            r"data.global_batch_size=3 is not divisible by .*data-parallel size 2",
        ),
        (["parallel.pipeline=2", "model.language.num_layers=3"], r"num_layers=3 is not divisible by"),
        (
            ["data.seq_length=8192"],
            r"data.seq_length=8192 exceeds model.language.max_position_embeddings=4096",
        ),
        (["data.stages=[{name: s, sources: [{prefix: x}]}]"], r"data.path=.* and data.stages .* both"),
    ],
)
def test_a_mismatch_stops_before_any_step_naming_both_sides(tmp_path, overrides, message):
    """Fails if the check is removed (the run would start and crash or silently mistrain later)."""
    cfg = _cfg(_manifest(tmp_path / "ds"), *overrides)
    with pytest.raises(StartupError, match=message):
        check_run(cfg, 2)


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(StartupError, match=r"nope.manifest.json not found"):
        check_run(_cfg(tmp_path / "nope"), 1)


def _clock_lrs(clock, positions, cfg, stage):
    from megasail.training.optim import build_scheduler

    holder = type("Opt", (), {"param_groups": [{}]})()
    scheduler = build_scheduler(cfg, holder, stage, clock)
    lrs = []
    for before, after in zip(positions[:-1], positions[1:], strict=True):
        scheduler.advance(clock.increment(before, after))  # as the loop does, before the update
        lrs.append(holder.param_groups[0]["lr"])
    scheduler.advance(0.0)  # a step that would start where the budget is spent
    return lrs, holder.param_groups[0]["lr"]


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "linear"])
def test_stage_schedule_ends_exactly_when_the_token_budget_is_spent(schedule):
    """The stage's clock runs on the tokens each global batch consumed: its LR falls every step and
    is min_lr exactly after the batch that spends the budget (the loader's next position is the
    next stage), however many steps the packing made of it.

    Fails if the clock counted optimizer steps (the decay would end at a guessed step count)."""
    from megasail.data.loader.config import SourceConfig, StageConfig
    from megasail.training.optim import stage_clock

    cfg = load_config(
        TINY_YAML,
        [
            f"optim.schedule={schedule}",
            "optim.warmup_steps=0",
            "optim.lr=1e-3",
            "optim.min_lr=1e-4",
            "optim.wsd_decay_fraction=0.5",
        ],
    )
    stage = StageConfig(name="s", sources=[SourceConfig("x")], budget_tokens=1000)
    clock = stage_clock(cfg, stage, 0)
    tokens = [0, 180, 420, 610, 790, 950]  # uneven batches; the next one crosses the budget
    positions = [LoaderPosition(stage=0, stage_tokens=t) for t in tokens] + [LoaderPosition(stage=1)]
    lrs, final = _clock_lrs(clock, positions, cfg, stage)
    assert lrs[0] == pytest.approx(1e-3)
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False)) and lrs[-1] > 1e-4
    assert final == pytest.approx(1e-4)


def test_thd_inputs_keep_later_stages_none_fields():
    """A later pipeline stage's batch has no input_ids/labels/loss_mask: THD flattening keeps them None.

    Fails if thd_inputs reshapes every field (AttributeError on None at PP > 1 with Transformer Engine)."""
    from megasail.training.step import thd_inputs

    batch = {
        "input_ids": None,
        "labels": None,
        "loss_mask": None,
        "position_ids": torch.arange(8).view(2, 4),
        "cu_seqlens": torch.tensor([0, 3, 4, 8], dtype=torch.int32),
        "attention_mask": None,
    }
    flat, params = thd_inputs(batch)
    assert flat["input_ids"] is None and flat["labels"] is None and flat["loss_mask"] is None
    assert flat["position_ids"].shape == (1, 8) and params.max_seqlen_q == 4


def test_help_lists_every_key_with_doc_and_default():
    """pretrain_vlm.py --help lists each config key, list items included (data.stages[].lr).

    Fails if a section or the list-item expansion is missing from the help."""
    out = subprocess.run(
        [sys.executable, "pretrain_vlm.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for key in (
        "train.iters=None",
        "optim.schedule='cosine'",
        "checkpoint.interval=0",
        "logging.wandb=True",
        "data.path=None",
        "data.stages[].lr=None",
        "data.stages[].sources[].prefix=",
        "parallel.tensor=1",
    ):
        assert f"  {key}" in out, key
    assert config_help() in out  # every key, in full
