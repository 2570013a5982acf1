"""The one FLOPs convention (megasail.models.flops) against the formula written out here, the GPU peak
table, and every counter that reads it: the loop's step terms, tools/bench_model.py and the loader's
generated preset prices."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from megasail.data.format.reader import TokenizedSample
from megasail.data.loader.packing import PackedSequence, collate_packed
from megasail.models.presets import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMG = 151667
SEQ = 640
TILE_TOKENS = 256


def _sample(n: int, tiles: int) -> TokenizedSample:
    image = [IMG - 2] + [IMG] * (TILE_TOKENS * tiles) + [IMG - 1] if tiles else []
    ids = np.array([5] * 8 + image + [7] * (n - 8 - len(image)), np.int32)
    return TokenizedSample(ids, np.ones(n, bool), [tiles] if tiles else [])


def _row(lengths_tiles) -> PackedSequence:
    samples = [_sample(n, t) for n, t in lengths_tiles]
    pixels = [torch.zeros(t, 3, 448, 448) for _, t in lengths_tiles if t]
    return PackedSequence(samples, pixels)


def packed_batch(rows=(((530, 2), (40, 0)),)) -> dict:
    """A packed micro-batch: by default one row holding a 530-token sample with two tiles, a 40-token
    text-only sample, then 70 slots of padding (its own segment)."""
    return collate_packed([_row(r) for r in rows], SEQ, pad_token_id=0, img_context_id=IMG)


def written_out(trainable: set[str], recompute: str = "none") -> dict[str, float]:
    """FLOPs of ``packed_batch()`` on the tiny model, from its dimensions (2 FLOPs per multiply-add):
    {"model": MFU FLOPs, "hardware": with recomputation, "fp8able": the LLM decoder linear share of model}."""
    # tiny preset: ViT 2 layers, hidden 64, ffn 128, 448px tiles of 14px patches (1024 + cls = 1025 tokens)
    vh, vf, vl, vs, patches = 64, 128, 2, 1025, 1024
    # projector: 2x2 pixel shuffle -> 256 tokens of 4 * 64 = 256 channels -> 64 -> 64
    # LLM: 4 layers, hidden 64, 4 heads of 16, 2 KV groups, SwiGLU 128, vocab 151936
    lh, heads, groups, hd, lf, ll, vocab = 64, 4, 2, 16, 128, 4, 151936
    tiles, lengths = 2, [530, 40]  # the 70 padding slots never count
    tokens = sum(lengths)
    pairs = sum(n * (n + 1) // 2 for n in lengths)

    vit_patch = tiles * 2 * patches * (3 * 14 * 14) * vh  # conv as a matmul over each patch
    vit_linear = tiles * vl * vs * (2 * vh * 3 * vh + 2 * vh * vh + 2 * vh * vf + 2 * vf * vh)
    vit_core = tiles * vl * (2 * vs * vs * vh + 2 * vs * vs * vh)  # bidirectional QK^T and AV per tile
    projector = tiles * 256 * (2 * 256 * lh + 2 * lh * lh)
    llm_layer_linear = (
        2 * lh * heads * hd + 2 * 2 * lh * groups * hd + 2 * heads * hd * lh + 2 * lh * 2 * lf + 2 * lf * lh
    )
    llm_linear = tokens * ll * llm_layer_linear
    llm_head = tokens * 2 * lh * vocab
    llm_core = pairs * ll * (2 * heads * hd + 2 * heads * hd)  # QK^T and AV per causal pair

    vision_weights = 3 if "vision" in trainable else 1  # nothing before the ViT: frozen = forward only
    vision_core = vision_weights
    proj_factor = 3 if "projector" in trainable else (2 if "vision" in trainable else 1)
    upstream = bool({"vision", "projector"} & trainable)
    llm_weights = 3 if "language" in trainable else (2 if upstream else 1)
    llm_core_factor = 3 if ("language" in trainable or upstream) else 1
    model = (
        vision_weights * (vit_patch + vit_linear) + vision_core * vit_core + proj_factor * projector
        + llm_weights * (llm_linear + llm_head) + llm_core_factor * llm_core
    )
    extra = 0.0
    vit_backward, llm_backward = vision_weights > 1, llm_weights > 1
    if recompute == "selective":
        extra = vit_backward * vit_core + llm_backward * llm_core
    elif recompute == "full":
        extra = vit_backward * (vit_linear + vit_core) + llm_backward * (llm_linear + llm_core)
    return {"model": float(model), "hardware": float(model + extra), "fp8able": float(llm_weights * llm_linear)}


@pytest.mark.parametrize(
    "trainable",
    [["vision", "projector", "language"], ["projector"], ["vision", "projector"], ["language"]],
)
def test_packed_batch_flops_follow_the_written_out_formula(trainable):
    """A trained tower 3x; the frozen LLM behind a trained projector 2x its weight matmuls and 3x its
    attention core; a frozen ViT with nothing trained before it 1x; real tokens only, causal pairs
    within each sample, the ViT's full square per tile.

    Fault caught (each planted once and seen failing): padding counted as tokens or as its own causal
    segment; the frozen LLM's attention core charged 2x; a frozen leaf ViT charged 2x; the logits
    left out; the ViT's attention counted once per batch instead of per tile."""
    from megasail.models.flops import FlopsModel

    step = FlopsModel.from_config(tiny()).batch_flops(packed_batch(), trainable)
    want = written_out(set(trainable))
    assert step.model_bf16 == pytest.approx(want["model"], rel=1e-12)
    assert step.model_fp8 == 0.0 and step.hardware == step.model  # no recompute, no FP8


@pytest.mark.parametrize("recompute", ["selective", "full"])
@pytest.mark.parametrize("trainable", [["projector"], ["vision", "projector", "language"]])
def test_recomputation_is_in_hfu_only(recompute, trainable):
    """selective adds one forward of the attention core, full one forward of every layer, in the
    towers whose backward runs; model FLOPs (MFU) stay the same.

    Fault caught: recomputation added to model FLOPs; the frozen leaf ViT charged a recompute it
    never runs; full recompute charging the output layer or the projector."""
    from megasail.models.flops import FlopsModel

    step = FlopsModel.from_config(tiny(), recompute).batch_flops(packed_batch(), trainable)
    want = written_out(set(trainable), recompute)
    assert step.model == pytest.approx(want["model"], rel=1e-12)
    assert step.hardware == pytest.approx(want["hardware"], rel=1e-12)
    assert step.hardware > step.model


def test_fp8_runs_measure_each_part_against_its_own_peak():
    """With model.fp8 the LLM decoder's linear layers count against the FP8 peak, everything else
    (attention core, logits, ViT, projector) against bf16: MFU = sum(FLOPs_p / peak_p) / time.

    Fault caught: every FLOP divided by the FP8 peak (MFU halved), or the split ignored."""
    from megasail.models.flops import GPU_PEAKS, FlopsModel, step_metrics

    cfg = tiny()
    cfg.fp8, cfg.transformer_impl = "hybrid", "te"
    step = FlopsModel.from_config(cfg).batch_flops(packed_batch(), ["projector"])
    want = written_out({"projector"})
    assert step.model_fp8 == pytest.approx(want["fp8able"], rel=1e-12)
    assert step.model_bf16 == pytest.approx(want["model"] - want["fp8able"], rel=1e-12)
    seconds, world, h100 = 0.01, 2, GPU_PEAKS["H100-SXM"]
    m = step_metrics(step, seconds, world, h100)
    expected = (step.model_bf16 / 989e12 + step.model_fp8 / 1979e12) / (seconds * world)
    assert m["mfu"] == pytest.approx(expected, rel=1e-12) and m["hfu"] == pytest.approx(expected, rel=1e-12)
    assert m["tflops_per_device"] == pytest.approx(want["model"] / seconds / world / 1e12, rel=1e-12)
    assert step_metrics(step, seconds, world, GPU_PEAKS["A100"])["mfu"] is None  # A100 has no FP8


def test_peaks_by_exact_device_name(monkeypatch, caplog):
    """torch's device names map to dense peaks, the most specific name first; an unknown GPU gives a
    null MFU with one warning naming it.

    Fault caught: substring matching ("B200" inside "NVIDIA GB200"; "NVIDIA H100" giving the PCIe and
    NVL parts the SXM peak; "NVIDIA H200" taking "NVIDIA H200 NVL"); an unknown GPU warned every step."""
    from megasail.models import flops

    expected = {
        "NVIDIA A100-SXM4-80GB": (312, None),
        "NVIDIA A100 80GB PCIe": (312, None),
        "NVIDIA H100 80GB HBM3": (989, 1979),
        "NVIDIA H100 PCIe": (756, 1513),
        "NVIDIA H100 NVL": (835, 1671),
        "NVIDIA H200": (989, 1979),
        "NVIDIA H200 NVL": (835, 1671),
        "NVIDIA B200": (2250, 4500),
        "NVIDIA GB200": (2500, 5000),
    }
    for name, (bf16, fp8) in expected.items():
        peak = flops.GPU_PEAKS[flops.gpu_for_device(name)]
        assert (peak.bf16, peak.fp8) == (bf16, fp8), name
    assert flops.gpu_for_device("NVIDIA L40S") is None and flops.gpu_for_device("NVIDIA H100") is None

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA RTX 9999")
    monkeypatch.setattr(flops, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="megasail.models.flops"):
        assert flops.run_peak(tiny()) is None and flops.run_peak(tiny()) is None
    warnings = [r.getMessage() for r in caplog.records if "NVIDIA RTX 9999" in r.getMessage()]
    assert len(warnings) == 1
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GB200")
    bf16 = tiny()
    bf16.precision = "bf16"
    assert flops.run_peak(bf16) == flops.GPU_PEAKS["GB200"]


def _bench_model():
    spec = importlib.util.spec_from_file_location("bench_model", os.path.join(REPO, "tools", "bench_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_model_and_the_training_loop_count_one_batch_alike(monkeypatch):
    """tools/bench_model.py and the loop's per-step terms give the same FLOPs for one packed batch
    (two rows, padding in both), and equal the written-out formula.

    Fault caught: bench_model counting every slot and the full s^2 square (its old formula), or the
    loop counting padding segments."""
    from megasail.config import load_config
    from megasail.models.flops import FlopsModel, StepFlops
    from megasail.training import loop

    cfg = load_config(os.path.join(REPO, "examples", "configs", "tiny.yaml"), [f"data.seq_length={SEQ}"])
    cfg.model.language.vocab_size = 151936
    batch = packed_batch(rows=(((530, 2), (40, 0)), ((300, 0), (200, 0))))
    every = ["vision", "projector", "language"]
    bench = _bench_model().count_flops(cfg.model, batch, every)

    for name, value in (
        ("get_tensor_model_parallel_rank", lambda: 0),
        ("is_pipeline_first_stage", lambda **k: True),
        ("is_pipeline_last_stage", lambda **k: False),
    ):
        monkeypatch.setattr(loop.parallel_state, name, value)
    terms = loop._step_terms([batch], [], cfg, FlopsModel.from_config(cfg.model), every)
    from_loop = StepFlops(*terms[5:].tolist())
    assert from_loop == bench
    one_row = written_out(set(every))["model"]
    second_row = FlopsModel.from_config(cfg.model).step_flops(0, [300, 200], every).model
    assert bench.model == pytest.approx(one_row + second_row, rel=1e-12)
    assert terms[2] == 530 + 40 + 300 + 200  # the loop's token count: real tokens, as the FLOPs


def test_preset_costs_table_is_generated_from_the_flops_module(tmp_path):
    """tools/generate_preset_costs.py --check passes on the tree and fails on a stale table, which the
    tool then rewrites.

    Fault caught: a hand-edited price in balance.py's PRESET_COSTS (planted in a copy)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    tool = [sys.executable, os.path.join(REPO, "tools", "generate_preset_costs.py")]
    ok = subprocess.run([*tool, "--check"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    copy = tmp_path / "balance.py"
    shutil.copy(os.path.join(REPO, "megasail", "data", "loader", "balance.py"), copy)
    copy.write_text(copy.read_text().replace("pair_flops=512.0", "pair_flops=1024.0"))
    stale = subprocess.run([*tool, "--check", "--path", str(copy)], env=env, capture_output=True, text=True)
    assert stale.returncode == 1 and "PRESET_COSTS differs" in stale.stderr
    subprocess.run([*tool, "--path", str(copy)], env=env, check=True, capture_output=True)
    assert "pair_flops=512.0" in copy.read_text()
    again = subprocess.run([*tool, "--check", "--path", str(copy)], env=env, capture_output=True, text=True)
    assert again.returncode == 0
