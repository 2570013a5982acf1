"""FLOPs of a training step and the GPU peaks they are measured against: the one convention.

Everything that counts FLOPs reads this module: the training loop (``tflops_per_device``, ``mfu`` and
``hfu`` in metrics.jsonl), ``megasail.plan``, ``tools/bench_model.py``, ``tools/bench_train.py``,
``tools/model_summary.py``, the ViT-aware pipeline split, and the data-parallel balancing prices
(``megasail.training.costs.cost_model``; the loader's table ``PRESET_COSTS`` in
``megasail/data/loader/balance.py`` is written from here by ``tools/generate_preset_costs.py``).

The convention (2 FLOPs per multiply-add; matmuls only: norms, activations, softmax and RoPE are not counted):

* Real tokens only. A packed row holds samples, then padding as its own segment; the padding never
  counts, neither in the per-token terms nor in attention.
* LLM per real token: every decoder layer's qkv, output projection, SwiGLU fc1 (gate + up) and fc2, and
  the output layer (the logits over the vocabulary).
* LLM attention core (QK^T and AV) causal within each packed sample: a sample of l tokens has
  l (l + 1) / 2 (query, key) pairs, 4 x heads x head_dim FLOPs each in every layer.
* ViT per tile (thumbnails included): the patch embedding, then in every layer that runs qkv, proj, fc1
  and fc2 over the tile's s = patches + cls tokens, and the bidirectional attention core over all s^2 pairs.
* Projector per tile: the tile's pixel-shuffled tokens through its two linear layers.
* Training multiplies each forward term by what its part runs in backward (forward order: vision ->
  projector -> language):

      part                                                  weight matmuls   attention core
      trains                                                      3                3
      frozen, gradients flow through it (a part before trains)    2                3
      frozen, nothing before it trains                            1                1

  A weight matmul Y = X W needs dX = dY W^T (1x forward) to pass the gradient on and dW = X^T dY (1x)
  to train: 3 when it trains, 2 when frozen with a trained part before it. The attention core
  multiplies two activations (S = Q K^T, O = P V): passing a gradient through it takes the gradients
  of both operands (dQ and dK, dP and dV), 2x forward, whether the part trains or not: 3 in all.
  The frozen LLM behind a trained projector is the middle row; a frozen ViT while only the projector
  trains is the last (its input, the pixels, needs no gradient). A trained ViT's patch embedding is
  charged 3x although the pixels' gradient is never computed (about 0.06% of the ViT's FLOPs).
* Recomputation is not model FLOPs: MFU leaves it out, HFU adds it. ``train.recompute=selective``
  re-runs each layer's attention core forward in backward (+1x the attention core), ``full`` re-runs
  each layer (+1x its matmuls and attention core), in the ViT and LLM layers whose backward runs (a
  part that runs forward only has no backward to recompute for). The patch embedding, projector and
  output layer are never recomputed.
* Precision: with ``model.fp8`` Transformer Engine runs the LLM decoder layers' linear layers in FP8
  (``mcore_config.language_transformer_config`` is the only config given fp8); the attention core, output
  layer, ViT and projector stay in bf16 (or fp16: the same tensor-core peak).
  MFU = sum over precisions p of FLOPs_p / peak_p, divided by step time x devices; HFU likewise.

Megatron-LM's ``num_floating_point_operations`` (megatron/training/training.py) counts the same LLM
matmul terms (it has no vision tower), every one 3x (nothing frozen), the attention core causally as
half the square (seq_length / 2 keys per query, for QK^T and for AV; not the full s^2), the logits per
token, and no recomputation, over batch_size x seq_length token slots with the square taken over the
whole row: padding and the pairs across packed samples count too. Versions with its sequence-packing
scheduler take the sum of real sample lengths and of their squares instead.
"""

from __future__ import annotations

import logging
from dataclasses import astuple, dataclass

from megasail.models.config import ModelConfig

log = logging.getLogger(__name__)

ORDER = ("vision", "projector", "language")  # forward order; gradients flow back through it
# role -> (weight-matmul factor, attention-core factor); see the table in the module docstring
FACTORS = {"trains": (3, 3), "through": (2, 3), "forward": (1, 1)}


def gradient_roles(trainable: list[str]) -> dict[str, str]:
    """Each part's role in backward: "trains", "through" (frozen, a part before it trains) or "forward"."""
    roles, upstream = {}, False
    for part in ORDER:
        roles[part] = "trains" if part in trainable else ("through" if upstream else "forward")
        upstream = upstream or part in trainable
    return roles


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of some work by precision: model FLOPs (MFU) and hardware FLOPs (HFU: model + recompute)."""

    model_bf16: float = 0.0
    model_fp8: float = 0.0
    hardware_bf16: float = 0.0
    hardware_fp8: float = 0.0

    @property
    def model(self) -> float:
        return self.model_bf16 + self.model_fp8

    @property
    def hardware(self) -> float:
        return self.hardware_bf16 + self.hardware_fp8

    def as_tuple(self) -> tuple[float, float, float, float]:
        return astuple(self)


@dataclass(frozen=True)
class _Term:
    part: str
    flops: float  # forward FLOPs
    core: bool  # attention core (no weights) rather than a weight matmul
    in_layers: bool  # inside a transformer layer (recomputed by train.recompute)
    fp8: bool  # run in FP8 when model.fp8 is set


@dataclass(frozen=True)
class FlopsModel:
    """Forward FLOPs per unit of work of one model config, and what a step executes (module docstring)."""

    vit_patch_per_tile: float  # patch embedding (a conv over the tile)
    vit_linear_per_tile: float  # qkv, proj, fc1, fc2 of every ViT layer that runs, over the tile's tokens
    vit_attention_per_tile: float  # bidirectional attention core of those layers, s^2 pairs per tile
    projector_per_tile: float  # the projector's two linear layers over the tile's tokens
    llm_linear_per_token: float  # qkv, proj, fc1, fc2 of every decoder layer
    llm_head_per_token: float  # output layer (logits)
    llm_attention_per_pair: float  # QK^T + AV of every decoder layer per causal (query, key) pair
    fp8: bool = False  # model.fp8: the decoder layers' linear layers run in FP8
    recompute: str = "none"  # train.recompute: none, selective or full

    @classmethod
    def from_config(cls, config: ModelConfig, recompute: str = "none") -> FlopsModel:
        vit, lm = config.vision, config.language
        s, h, f = vit.seq_length, vit.hidden_size, vit.ffn_hidden_size
        d, lh = lm.kv_channels, lm.hidden_size
        qkv = 2 * lh * (lm.num_attention_heads + 2 * lm.num_query_groups) * d
        proj = 2 * lm.num_attention_heads * d * lh
        mlp = 2 * 3 * lh * lm.ffn_hidden_size  # gate, up, down
        return cls(
            vit_patch_per_tile=float(2 * vit.num_patches * vit.num_channels * vit.patch_size**2 * h),
            vit_linear_per_tile=float(vit.num_layers_used * 2 * s * (4 * h * h + 2 * h * f)),
            vit_attention_per_tile=float(vit.num_layers_used * 4 * s * s * h),
            projector_per_tile=float(
                2 * config.tokens_per_tile * (config.projector_input_size * lh + lh * lh)
            ),
            llm_linear_per_token=float(lm.num_layers * (qkv + proj + mlp)),
            llm_head_per_token=float(2 * lh * lm.vocab_size),
            llm_attention_per_pair=float(lm.num_layers * 4 * lm.num_attention_heads * d),
            fp8=config.fp8 is not None,
            recompute=recompute,
        )

    def _terms(self, tiles: float, sample_lengths: list[float]) -> list[_Term]:
        tokens = float(sum(sample_lengths))
        pairs = sum(n * (n + 1) / 2 for n in sample_lengths)
        return [
            _Term("vision", tiles * self.vit_patch_per_tile, False, False, False),
            _Term("vision", tiles * self.vit_linear_per_tile, False, True, False),
            _Term("vision", tiles * self.vit_attention_per_tile, True, True, False),
            _Term("projector", tiles * self.projector_per_tile, False, False, False),
            _Term("language", tokens * self.llm_linear_per_token, False, True, True),
            _Term("language", tokens * self.llm_head_per_token, False, False, False),
            _Term("language", pairs * self.llm_attention_per_pair, True, True, False),
        ]

    def forward_flops(self, tiles: float, sample_lengths: list[float]) -> dict[str, float]:
        """Forward FLOPs per part for ``tiles`` image tiles and LLM samples of the given lengths
        (real tokens only: padding is not a sample)."""
        parts = dict.fromkeys(ORDER, 0.0)
        for t in self._terms(tiles, sample_lengths):
            parts[t.part] += t.flops
        return parts

    def step_flops(self, tiles: float, sample_lengths: list[float], trainable: list[str]) -> StepFlops:
        """What a training step executes on this work when the ``trainable`` parts learn."""
        roles = gradient_roles(trainable)
        out = {"model_bf16": 0.0, "model_fp8": 0.0, "hardware_bf16": 0.0, "hardware_fp8": 0.0}
        for t in self._terms(tiles, sample_lengths):
            role = roles[t.part]
            factor = FACTORS[role][1 if t.core else 0]
            backward_runs = role != "forward"
            recomputed = self.recompute == "full" or (self.recompute == "selective" and t.core)
            extra = 1 if (backward_runs and t.in_layers and recomputed) else 0
            precision = "fp8" if (self.fp8 and t.fp8) else "bf16"
            out[f"model_{precision}"] += factor * t.flops
            out[f"hardware_{precision}"] += (factor + extra) * t.flops
        return StepFlops(**out)

    def batch_flops(self, batch: dict, trainable: list[str]) -> StepFlops:
        """``step_flops`` of one packed micro-batch of the loader (``collate_packed``'s dict)."""
        pixels = batch.get("pixel_values")
        tiles = int(pixels.shape[0]) if pixels is not None else 0
        return self.step_flops(tiles, batch_sample_lengths(batch), trainable)

    def describe(self, trainable: list[str]) -> str:
        """The formula with this stage's factors, printed when a stage starts."""
        roles = gradient_roles(trainable)
        w = {p: FACTORS[r][0] for p, r in roles.items()}
        a = {p: FACTORS[r][1] for p, r in roles.items()}
        vit = self.vit_patch_per_tile + self.vit_linear_per_tile
        return (
            f"FLOPs per step = tiles x ({w['vision']} x ViT {vit / 1e9:.3f} + {a['vision']} x ViT attention "
            f"{self.vit_attention_per_tile / 1e9:.3f} + {w['projector']} x projector "
            f"{self.projector_per_tile / 1e9:.3f}) GF + real tokens x {w['language']} x LLM "
            f"{(self.llm_linear_per_token + self.llm_head_per_token) / 1e6:.3f} MF + causal pairs x "
            f"{a['language']} x LLM attention {self.llm_attention_per_pair / 1e3:.3f} KF  [3 = trains, "
            f"2 / 3 = frozen with gradients flowing through (weights / attention), 1 = forward only; "
            f"recompute={self.recompute} counted in hfu only]"
        )


def batch_sample_lengths(batch: dict) -> list[int]:
    """Lengths of the real samples of a packed batch: each row's first ``num_samples[row]`` segments of
    ``cu_seqlens`` (offsets over the flattened [b * s] stream; the rest of a row is padding)."""
    bounds = [int(x) for x in batch["cu_seqlens"].tolist()]
    rows = batch["num_samples"].tolist()
    seq_length = int(batch["position_ids"].shape[-1])
    lengths = []
    for row, n in enumerate(rows):
        inner = [b for b in bounds if row * seq_length <= b <= (row + 1) * seq_length]
        lengths += [b - a for a, b in zip(inner[: int(n)], inner[1 : int(n) + 1], strict=True)]
    return lengths


def vision_flops_per_tile(config: ModelConfig) -> float:
    """Forward FLOPs of the ViT (patch embedding + the layers that run) and the projector for one tile."""
    f = FlopsModel.from_config(config)
    return f.vit_patch_per_tile + f.vit_linear_per_tile + f.vit_attention_per_tile + f.projector_per_tile


def sequence_flops(config: ModelConfig, seq_length: int, tiles: float) -> float:
    """Forward FLOPs of one sequence: one causal sample of ``seq_length`` tokens and ``tiles`` tiles."""
    return sum(FlopsModel.from_config(config).forward_flops(tiles, [seq_length]).values())


def balancing_prices(config: ModelConfig) -> dict[str, float]:
    """Forward prices of the loader's ``SequenceCostModel`` (DP balancing): per token slot (every slot
    of a row costs the same time, so this term is equal for all rows), per squared sample length
    (sum l^2 / 2 approximates the causal pairs) and per tile."""
    f = FlopsModel.from_config(config)
    return {
        "token_flops": f.llm_linear_per_token + f.llm_head_per_token,
        "pair_flops": f.llm_attention_per_pair / 2,
        "tile_flops": f.vit_patch_per_tile + f.vit_linear_per_tile + f.vit_attention_per_tile
        + f.projector_per_tile,
    }


def suggest_first_stage_layers(config: ModelConfig, pipeline: int, seq_length: int, tiles_per_sequence: float,
                               virtual_pipeline: int | None = None) -> int | None:
    """LLM layers for pipeline stage 0 that best balance it (ViT + projector + its layers) against
    the other stages (forward FLOPs of a sequence holding one causal sample), among the splits megatron
    accepts: stage 0 keeps at least one layer, the rest divide evenly over the other stages, and with
    virtual pipeline every stage's count divides by the number of chunks. None when PP is 1 or no split
    qualifies."""
    if pipeline == 1:
        return None
    vpp = virtual_pipeline or 1
    f = FlopsModel.from_config(config)
    layers = config.language.num_layers
    pairs = seq_length * (seq_length + 1) / 2
    layer = (seq_length * f.llm_linear_per_token + pairs * f.llm_attention_per_pair) / layers
    vision = tiles_per_sequence * vision_flops_per_tile(config)
    head = seq_length * f.llm_head_per_token
    best, best_cost = None, float("inf")
    for first in range(1, layers):  # megatron refuses an empty first stage
        rest = layers - first
        if rest % (pipeline - 1):
            continue
        per_stage = rest // (pipeline - 1)
        if first % vpp or per_stage % vpp:
            continue
        cost = max(vision + first * layer, per_stage * layer + head)
        if cost < best_cost:
            best, best_cost = first, cost
    return best


# ---------------------------------------------------------------- peaks
@dataclass(frozen=True)
class Peak:
    """Dense (not 2:4 sparse) tensor-core TFLOP/s of one GPU: bf16/fp16 and fp8 (None: no FP8)."""

    bf16: float
    fp8: float | None


# NVIDIA's datasheets list with-sparsity figures; dense is half. Per GPU, by product page:
#   A100 (SXM and PCIe alike): BF16 312                https://www.nvidia.com/en-us/data-center/a100/
#   H100 SXM / H100 NVL: BF16 1,979 / 1,671, FP8 3,958 / 3,341 (sparse)
#   H100 PCIe (product brief PB-11133-001): BF16 1,513, FP8 3,026 (sparse)
#                                                      https://www.nvidia.com/en-us/data-center/h100/
#   H200 SXM / H200 NVL: BF16 1,979 / 1,671, FP8 3,958 / 3,341 (sparse)
#                                                      https://www.nvidia.com/en-us/data-center/h200/
#   HGX B200 / GB200 NVL72, per GPU: FP16/BF16 4.5 / 5 PF, FP8 9 / 10 PF (sparse)
#                                                      https://www.nvidia.com/en-us/data-center/gb200-nvl72/
GPU_PEAKS = {
    "A100": Peak(312.0, None),
    "H100-SXM": Peak(989.0, 1979.0),
    "H100-PCIe": Peak(756.0, 1513.0),
    "H100-NVL": Peak(835.0, 1671.0),
    "H200": Peak(989.0, 1979.0),
    "H200-NVL": Peak(835.0, 1671.0),
    "B200": Peak(2250.0, 4500.0),
    "GB200": Peak(2500.0, 5000.0),
}
# torch.cuda.get_device_name() -> GPU_PEAKS key: the name itself or a prefix of it ending at a word,
# longest first ("NVIDIA H200 NVL" before "NVIDIA H200"; "NVIDIA B200" never matches "NVIDIA GB200")
DEVICE_NAMES = {
    "NVIDIA A100": "A100",  # NVIDIA A100-SXM4-80GB, NVIDIA A100 80GB PCIe, NVIDIA A100-PCIE-40GB, ...
    "NVIDIA H100 80GB HBM3": "H100-SXM",
    "NVIDIA H100 PCIe": "H100-PCIe",
    "NVIDIA H100 NVL": "H100-NVL",
    "NVIDIA H200": "H200",
    "NVIDIA H200 NVL": "H200-NVL",
    "NVIDIA B200": "B200",
    "NVIDIA GB200": "GB200",
}
_warned: set[str] = set()


def gpu_for_device(device_name: str) -> str | None:
    """The GPU_PEAKS key of a device name as torch reports it, or None when it is not in the table."""
    for prefix in sorted(DEVICE_NAMES, key=len, reverse=True):
        if device_name == prefix or (device_name.startswith(prefix) and device_name[len(prefix)] in " -"):
            return DEVICE_NAMES[prefix]
    return None


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def run_peak(config: ModelConfig) -> Peak | None:
    """This process's GPU peak for a run of ``config``; None on CPU, on an unknown GPU or at fp32
    (a one-time warning says which), and then MFU and HFU are null."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    gpu = gpu_for_device(name)
    if gpu is None:
        _warn_once(f"MFU is null: no peak TFLOP/s for GPU {name!r} in megasail.models.flops.DEVICE_NAMES")
        return None
    if config.precision == "fp32":
        _warn_once("MFU is null: model.precision=fp32 has no tensor-core peak in megasail.models.flops")
        return None
    return GPU_PEAKS[gpu]


def utilization(
    flops_bf16: float, flops_fp8: float, device_seconds: float, peak: Peak | None
) -> float | None:
    """Share of the peak used: (bf16 FLOPs / bf16 peak + fp8 FLOPs / fp8 peak) / device-seconds."""
    if peak is None or device_seconds <= 0:
        return None
    if flops_fp8 and peak.fp8 is None:
        _warn_once("MFU is null: the run executes FP8 FLOPs and this GPU's table entry has no FP8 peak")
        return None
    ideal = flops_bf16 / (peak.bf16 * 1e12) + (flops_fp8 / (peak.fp8 * 1e12) if flops_fp8 else 0.0)
    return ideal / device_seconds


def step_metrics(step: StepFlops, seconds: float, world: int, peak: Peak | None) -> dict:
    """``tflops_per_device`` (model FLOPs), ``mfu`` and ``hfu`` of a ``seconds`` step on ``world`` devices."""
    return {
        "tflops_per_device": step.model / seconds / world / 1e12 if seconds > 0 else 0.0,
        "mfu": utilization(step.model_bf16, step.model_fp8, seconds * world, peak),
        "hfu": utilization(step.hardware_bf16, step.hardware_fp8, seconds * world, peak),
    }
