"""Memory of a training run per GPU (or CPU process): the one model that the plan (``megasail.plan``),
``tools/model_summary.py`` and the start-up check (``megasail.training.checks.check_memory``) read.

What it counts, per pipeline rank, in bytes (``StageMemory``):

* Model state. Parameters are counted from the config (``parameter_counts``; a test holds the counts
  equal to the built model's): the ViT and projector on pipeline stage 0, the LLM's layers split by
  ``parallel.first_stage_llm_layers`` or evenly, the embedding on the first stage, the final norm and
  output layer on the last (a tied output layer: the embedding again on the last stage). Linear weights
  megatron splits over TP count 1/TP on each rank, norms, biases of row-parallel layers, layer scale,
  the cls token and position embedding count whole.

      weights      2 bytes per parameter (bf16/fp16), 4 (fp32), every parameter of the stage
      grads        4 per trainable parameter: megatron DDP's fp32 grad buffer (grad_reduce_in_fp32=True
                   in megasail.training.model_builder); full size on every DP rank (ZeRO-1 shards state,
                   not the buffer)
      optimizer    Adam's two fp32 moments (8) plus an fp32 main copy (4) when weights are 16-bit, per
                   trainable parameter, divided by DP under the distributed optimizer

  Frozen parameters (a curriculum stage's ``trainable``) have weights only: freezing happens before DDP
  wrapping, so they get no grad buffer and no optimizer state. Memory is therefore per curriculum stage.

* Activations: what autograd keeps from the forward of one micro-batch until its backward, found by
  walking megatron-core 0.16.1's saved tensors on the local spec (fp32, CPU) and stated per token in
  elements of the compute dtype (h hidden, f FFN, a heads, g query groups, d head dim, t TP; SP divides
  the h terms of the LLM by t too). Korthikanti et al. 2022 ("Reducing Activation Recomputation")
  count 34 s b h + 5 a s^2 b bytes per GPT layer in fp16; here, per LLM decoder layer that trains:

      norm inputs 2h, norm outputs (qkv and fc1 inputs) 2h, and on CPU 2h more (torch's composite
      RMSNorm keeps x * rstd; CUDA's fused kernel keeps only rstd); q h/t, k and v h/t each after
      megatron repeats the KV heads for the unfused core attention; the proj input h/t; SwiGLU 5f/t
      (fc1's output 2f/t, silu's output f/t, the linear half + 0 offset f/t, fc2's input f/t);
      RoPE's cos and sin for q and k (4 s d per micro-batch, not per sequence); and the softmax output
      a s/t per token in fp32 (plus its 16-bit copy at bf16/fp16: 6 bytes).

  Departures from Korthikanti's count: no dropout masks or dropout outputs (dropout is 0 here, and
  torch's dropout at p=0 returns its input), SwiGLU instead of GELU, GQA, RMSNorm's fp32 rstd and
  LayerNorm's fp32 mean and rstd per token (4 bytes each), and the attention mask: the local spec's
  [b, 1, s, s] bool mask comes from the loader once per micro-batch and is shared by every layer
  (``inputs`` below), where Korthikanti count an a s^2 b dropout mask per layer. Megatron's attention
  core under ``train.recompute=selective`` keeps its inputs only: q h/t, k g d/t and the fused qkv
  output (h + 2 g d)/t that v is a view of, no softmax. With Transformer Engine (flash attention) the
  same inputs stay and no softmax is kept either, whatever the recompute mode. ``full`` keeps each
  block's input (s b h / recompute_num_layers per layer) and rebuilds one block at a time in backward.
  A frozen layer behind a trained part keeps what its input gradient needs: norm inputs 2h, q/k/v,
  SwiGLU 4f/t (no linear inputs: megatron's frozen linears save no input). The ViT (per tile of
  s_v = patches + cls tokens, on stage 0, only when it trains): LayerNorm inputs and outputs 4h,
  layer-scale inputs 2h, the fused qkv output 3h/t (q, k, v are views of it), proj input h/t, GELU input
  and output 2f/t, and the softmax a s_v/t (fp32) unless flash attention or recompute drops it; the
  patch convolution keeps its pixels (a 16-bit or device copy of the loader's fp32 tiles). The
  projector per tile: its LayerNorm input and output 2 x (4 ViT h) and GELU input and output 2 h/t per
  token. The last stage keeps the final norm's tensors, the output layer's input and the logits softmax
  of the fp32 cross entropy, s b vocab/t x 4 bytes (megatron's cross entropy works in place on it).

* The 1F1B schedule: pipeline rank r holds min(pp - r, micro-batches) micro-batches' activations at
  once (stage 0 holds pp of them, and only stage 0 has the ViT); interleaved (VPP) rank 0 runs
  2 (pp - 1) + (vpp - 1) pp chunk forwards before its first backward. A non-last stage also keeps each
  in-flight micro-batch's output (s b h), megatron's deallocate_pipeline_outputs being off.

* Inputs: the packed micro-batch (ids, labels, positions, loss mask, the local spec's [b, 1, s, s]
  bool attention mask, fp32 pixels). On a CPU the loader's whole step (every micro-batch of this DP
  rank) is resident; on a GPU each in-flight micro-batch keeps its mask (local spec) on the device.

* Working set during one micro-batch's backward (``transient``): backward visits the pieces in reverse
  (head, LLM layers, projector, ViT layers) and frees each one's saved tensors after it; a piece adds
  what recomputation rebuilds (``selective``: the softmax and repeated k, v; ``full``: its block's
  layers) and the gradients of its largest intermediates (2 a s^2 for the unfused softmax's and its
  input's gradients, else the MLP's), the head the output layer's weight gradient. ``transient`` is the
  largest of these less what the pieces after it had freed already. On a GPU the unfused core
  attention also keeps megatron's global scores buffer (the largest [b a/t, s, s]); on a CPU its pages
  are never written (baddbmm with beta 0) and never become resident.

Checked here: tests/test_memory.py holds every activation term of the local spec equal to the tensors
autograd saves (CPU, fp32; none, selective and full; a trained and a frozen LLM) and the parameter
counts equal to the built model's; tests/test_plan_measured.py holds the plan within 20% of each rank's
measured peak at TP=1 and PP=2 on CPU (it came within 4%). The GPU-only terms (CUDA's fused RMSNorm,
Transformer Engine's attention and fused norms, the scores buffer) follow those libraries' code and were
not measured.

Not counted: the CUDA context and NCCL buffers (about 1 GiB per GPU), allocator fragmentation (on a CPU
glibc's malloc keeps freed activations: the measured test config's peak RSS reached twice the estimate
within 16 steps unless ``MALLOC_MMAP_THRESHOLD_`` was fixed), Python and library memory, checkpoint
saving. The plan leaves room for them by flagging a stage above ``--memory-fraction`` (0.9) of the GPU;
the start-up check refuses only an estimate above the whole budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from megasail.models.config import ModelConfig
from megasail.models.flops import gradient_roles

GIB = 2**30
WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
GRAD_BYTES = 4  # fp32 grad buffer (grad_reduce_in_fp32)
RECOMPUTE_MODES = ("none", "selective", "full")
PARTS = ("vision", "projector", "language")

# GPU memory per device in GiB, by the names of megasail.models.flops.GPU_PEAKS (NVIDIA's product pages;
# --gpu-memory-gb overrides, e.g. 40 for the 40 GB A100)
GPU_MEMORY_GIB = {
    "A100": 80.0,
    "H100-SXM": 80.0,
    "H100-PCIe": 80.0,
    "H100-NVL": 94.0,
    "H200": 141.0,
    "H200-NVL": 141.0,
    "B200": 192.0,
    "GB200": 186.0,
}


@dataclass(frozen=True)
class PartParameters:
    """Parameters of one piece of the model: ``sharded`` are split over TP ranks, ``replicated`` are whole."""

    sharded: int = 0
    replicated: int = 0

    def per_rank(self, tensor: int) -> float:
        return self.sharded / tensor + self.replicated

    @property
    def total(self) -> int:
        return self.sharded + self.replicated


def parameter_counts(model: ModelConfig) -> dict[str, PartParameters]:
    """The model's parameters by piece: vision, projector, embedding, llm_layer (one decoder layer),
    final_norm, output_layer (0 when tied to the embedding). Same layout as SailVLModel builds."""
    vit, lm = model.vision, model.language
    h, f = vit.hidden_size, vit.ffn_hidden_size
    vit_layer = PartParameters(
        sharded=3 * h * h + (3 * h if vit.qkv_bias else 0) + h * h + f * h + f + h * f,  # qkv, proj, fc1, fc2
        replicated=4 * h + 2 * h + h + h,  # two LayerNorms, ls1/ls2, proj and fc2 biases (row parallel)
    )
    embeddings = h * vit.num_channels * vit.patch_size**2 + h + int(vit.class_token) * h + vit.seq_length * h
    H, p = lm.hidden_size, model.projector_input_size
    qkv_out = (lm.num_attention_heads + 2 * lm.num_query_groups) * lm.kv_channels
    llm_layer = PartParameters(
        sharded=qkv_out * H
        + (qkv_out if lm.qkv_bias else 0)
        + lm.num_attention_heads * lm.kv_channels * H
        + 2 * lm.ffn_hidden_size * H
        + H * lm.ffn_hidden_size,
        replicated=2 * H,  # input and pre-MLP RMSNorm
    )
    untied = lm.untie_embeddings_and_output_weights
    return {
        "vision": PartParameters(
            vit.num_layers_used * vit_layer.sharded, vit.num_layers_used * vit_layer.replicated + embeddings
        ),
        "projector": PartParameters(sharded=p * H + H + H * H, replicated=2 * p + H),
        "embedding": PartParameters(sharded=lm.vocab_size * H),
        "llm_layer": llm_layer,
        "final_norm": PartParameters(replicated=H),
        "output_layer": PartParameters(sharded=lm.vocab_size * H if untied else 0),
    }


@dataclass(frozen=True)
class MemoryLayout:
    """Everything besides the model that decides memory per rank (``from_run`` reads a RunConfig)."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None
    data_parallel: int = 1
    sequence_parallel: bool = False
    first_stage_llm_layers: int | None = None
    distributed_optimizer: bool = True
    micro_batch_size: int = 1
    seq_length: int = 8192
    micro_batches: int = 1  # per DP rank per optimizer step
    tiles_per_sequence: float = 0.0
    recompute: str = "none"
    recompute_num_layers: int = 1
    flash_attention: bool = True  # Transformer Engine's fused attention (no s x s softmax kept)
    attention_mask: bool = False  # the local spec's [b, 1, s, s] bool mask, built on the device
    device: str = "gpu"  # "gpu" or "cpu" (composite RMSNorm, the whole step's batches in host memory)

    @classmethod
    def from_run(
        cls, run, data_parallel: int, tiles_per_sequence: float, *, flash_attention: bool, device: str = "gpu"
    ) -> MemoryLayout:
        p, d = run.parallel, run.data
        return cls(
            tensor=p.tensor,
            pipeline=p.pipeline,
            virtual_pipeline=p.virtual_pipeline,
            data_parallel=data_parallel,
            sequence_parallel=p.sequence_parallel,
            first_stage_llm_layers=p.first_stage_llm_layers,
            distributed_optimizer=p.distributed_optimizer,
            micro_batch_size=d.micro_batch_size,
            seq_length=d.seq_length,
            micro_batches=max(d.global_batch_size // (d.micro_batch_size * data_parallel), 1),
            tiles_per_sequence=tiles_per_sequence,
            recompute=run.train.recompute,
            recompute_num_layers=run.train.recompute_num_layers,
            flash_attention=flash_attention,
            attention_mask=not flash_attention,  # local layers: the forward step builds it from cu_seqlens
            device=device,
        )


@dataclass
class StageMemory:
    """Bytes one rank of pipeline stage ``pp_rank`` holds at its peak (module docstring)."""

    pp_rank: int
    llm_layers: int
    params: float  # on this rank (TP shard)
    trainable_params: float
    in_flight: int  # micro-batches whose activations are held at once
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0  # saved for backward, all in-flight micro-batches, logits excluded
    logits: float = 0.0
    inputs: float = 0.0
    transient: float = 0.0  # backward working set, attention scores buffer
    parts: dict = field(default_factory=dict)  # activation bytes per micro-batch by part

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.grads
            + self.optimizer
            + self.activations
            + self.logits
            + self.inputs
            + self.transient
        )

    def gib(self) -> dict:
        """The byte fields and the total in GiB (JSON-friendly, rounded to 3 digits)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "parts"}
        for key in ("weights", "grads", "optimizer", "activations", "logits", "inputs", "transient"):
            out[key + "_gib"] = round(out.pop(key) / GIB, 3)
        out["total_gib"] = round(self.total / GIB, 3)
        out["params"], out["trainable_params"] = int(self.params), int(self.trainable_params)
        return out


def stage_llm_layers(num_layers: int, layout: MemoryLayout) -> list[int]:
    """LLM decoder layers per pipeline rank (all its virtual chunks together)."""
    pp, first = layout.pipeline, layout.first_stage_llm_layers
    if pp == 1:
        return [num_layers]
    if first is None:
        return [num_layers // pp] * pp
    return [first] + [(num_layers - first) // (pp - 1)] * (pp - 1)


def in_flight_micro_batches(pp_rank: int, layout: MemoryLayout) -> list[int]:
    """Micro-batches each virtual chunk of ``pp_rank`` holds before its first backward (1F1B warm-up + 1)."""
    pp, m, vpp = layout.pipeline, layout.micro_batches, layout.virtual_pipeline or 1
    if vpp == 1:
        return [min(pp - pp_rank, m)]
    forwards = min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1, m * vpp)
    return [sum(1 for k in range(forwards) if (k // pp) % vpp == chunk) for chunk in range(vpp)]


def _attention_inputs(heads: int, groups: int, head_dim: int, rope: bool, unfused_none: bool) -> float:
    """Elements per token (before TP) megatron's attention core keeps of q, k and v."""
    h, gd = heads * head_dim, groups * head_dim
    if not rope:
        return 3 * h  # q, k, v are views of the fused qkv output
    if unfused_none and heads > groups:
        return 3 * h  # q, and k and v repeated to every head
    if unfused_none:
        return h + h + (h + 2 * gd)  # q and k after RoPE; v keeps the fused output alive
    return h + gd + (h + 2 * gd)  # checkpointed or flash inputs: q, k after RoPE, v (a view of qkv)


def _softmax_bytes(model: ModelConfig) -> int:
    """Bytes per softmax element kept by the unfused core attention: fp32, plus a 16-bit copy."""
    return 4 + (2 if WEIGHT_BYTES[model.precision] == 2 else 0)


def llm_layer_activations(
    model: ModelConfig, layout: MemoryLayout, role: str, mode: str | None = None
) -> float:
    """Bytes one decoder layer keeps for one micro-batch under ``mode`` (default: layout.recompute)
    when the language model's role is "trains" or "through" (flops.gradient_roles)."""
    if role == "forward":
        return 0.0
    lm, L = model.language, layout
    mode = mode or L.recompute
    e, t = WEIGHT_BYTES[model.precision], L.tensor
    sp = t if L.sequence_parallel else 1
    tokens = L.micro_batch_size * L.seq_length
    h, f = lm.hidden_size, lm.ffn_hidden_size
    if mode == "full":  # the block input, shared by recompute_num_layers layers
        return tokens * h * e / sp / L.recompute_num_layers
    trains = role == "trains"
    per_norm = (3 if L.device == "cpu" else 2) if trains else 1  # input [+ x * rstd on CPU] + output
    unfused_none = not L.flash_attention and mode == "none"
    per_token = 2 * per_norm * h / sp
    per_token += (
        _attention_inputs(lm.num_attention_heads, lm.num_query_groups, lm.kv_channels, True, unfused_none) / t
    )
    per_token += (h / t if trains or L.flash_attention else 0) + (5 if trains else 4) * f / t
    out = tokens * per_token * e + tokens * 2 * 4 / sp  # and each RMSNorm's fp32 rstd
    if not L.flash_attention:
        out += 4 * L.seq_length * lm.kv_channels * e  # RoPE cos/sin for q and k (unfused)
    if unfused_none:
        out += tokens * lm.num_attention_heads / t * L.seq_length * _softmax_bytes(model)
    return out


def vit_tile_activations(model: ModelConfig, layout: MemoryLayout, mode: str | None = None) -> float:
    """Bytes the ViT (every layer that runs) keeps per tile when it trains."""
    vit, L = model.vision, layout
    mode = mode or L.recompute
    e, t, s, h = WEIGHT_BYTES[model.precision], L.tensor, vit.seq_length, vit.hidden_size
    layers = vit.num_layers_used
    if mode == "full":
        return layers * s * h * e / L.recompute_num_layers
    per_token = 6 * h + (3 * h + h + 2 * vit.ffn_hidden_size) / t
    out = layers * s * (per_token * e + 2 * 2 * 4)  # and each LayerNorm's fp32 mean and rstd
    if not L.flash_attention and mode == "none":
        out += layers * vit.num_attention_heads / t * s * s * _softmax_bytes(model)
    pixels = vit.num_channels * vit.image_size**2
    # the patch conv keeps its input: the loader's fp32 pixels on CPU, a device (or 16-bit) copy elsewhere
    if L.device == "gpu" or e == 2:
        out += pixels * e
    return out


def projector_tile_activations(model: ModelConfig, layout: MemoryLayout, role: str) -> float:
    """Bytes the projector keeps per tile: LayerNorm input (and output), GELU input (and output)."""
    if role == "forward":
        return 0.0
    k = 2 if role == "trains" else 1
    per_token = k * (model.projector_input_size + model.language.hidden_size / layout.tensor)
    return model.tokens_per_tile * (per_token * WEIGHT_BYTES[model.precision] + 2 * 4)  # LayerNorm stats


def _head_activations(model: ModelConfig, layout: MemoryLayout, role: str) -> tuple[float, float]:
    """(final norm + output layer input, logits softmax) bytes per micro-batch on the last stage."""
    if role == "forward":
        return 0.0, 0.0
    e, t = WEIGHT_BYTES[model.precision], layout.tensor
    sp = t if layout.sequence_parallel else 1
    tokens = layout.micro_batch_size * layout.seq_length
    h = model.language.hidden_size
    kept = (3 if layout.device == "cpu" else 2) if role == "trains" else 1  # norm input [x*rstd], output
    return tokens * (h * kept * e + 4) / sp, tokens * model.language.vocab_size / t * 4


def _backward_peak(segments: list[tuple[float, float]]) -> float:
    """Extra bytes above the saved activations while one micro-batch runs backward: segments are
    (saved, working set) in forward order; backward frees each segment's saved tensors after it."""
    extra, later = 0.0, 0.0
    for saved, work in reversed(segments):
        extra = max(extra, work - later)
        later += saved
    return extra


def _probs_bytes(model: ModelConfig, layout: MemoryLayout, vision: bool) -> float:
    """Bytes of one layer's unfused softmax for one micro-batch of the LLM, or for one ViT tile."""
    if layout.flash_attention:
        return 0.0
    if vision:
        s = model.vision.seq_length
        return model.vision.num_attention_heads / layout.tensor * s * s * _softmax_bytes(model)
    tokens = layout.micro_batch_size * layout.seq_length
    return (
        tokens
        * model.language.num_attention_heads
        / layout.tensor
        * layout.seq_length
        * _softmax_bytes(model)
    )


def _layer_working_set(
    model: ModelConfig, layout: MemoryLayout, vision: bool, saved: float, none: float
) -> float:
    """Bytes a layer's backward adds on top of what it saved: what recomputation rebuilds (``full``:
    the block's layers, ``selective``: the attention core) and the gradients of its largest
    intermediates (the softmax's and its input's, or the MLP's)."""
    e, t = WEIGHT_BYTES[model.precision], layout.tensor
    if vision:
        tokens, mlp = model.vision.seq_length, 2 * model.vision.ffn_hidden_size / t
    else:
        tokens, mlp = layout.micro_batch_size * layout.seq_length, 4 * model.language.ffn_hidden_size / t
    rebuilt = none * layout.recompute_num_layers if layout.recompute == "full" else none - saved
    return rebuilt + max(2 * _probs_bytes(model, layout, vision), tokens * mlp * e)


def stage_memory(model: ModelConfig, layout: MemoryLayout, trainable: list[str]) -> list[StageMemory]:
    """Memory per pipeline rank of a stage that trains ``trainable`` (module docstring); one rank of
    each pipeline stage (TP and DP ranks of a stage hold the same)."""
    if layout.recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {layout.recompute!r}")
    roles = gradient_roles(list(trainable))
    counts = parameter_counts(model)
    layers = stage_llm_layers(model.language.num_layers, layout)
    pp, t, e = layout.pipeline, layout.tensor, WEIGHT_BYTES[model.precision]
    sp = t if layout.sequence_parallel else 1
    tokens = layout.micro_batch_size * layout.seq_length
    tiles = math.ceil(layout.tiles_per_sequence * layout.micro_batch_size - 1e-9)
    vpp = layout.virtual_pipeline or 1
    tied = not model.language.untie_embeddings_and_output_weights
    state_bytes = 8 + (4 if e == 2 else 0)
    llm_saved = llm_layer_activations(model, layout, roles["language"])
    llm_none = llm_layer_activations(model, layout, roles["language"], "none")
    vit_trains = roles["vision"] == "trains"
    vit_saved = tiles * vit_tile_activations(model, layout) if vit_trains else 0.0
    vit_none = tiles * vit_tile_activations(model, layout, "none") if vit_trains else 0.0
    proj_saved = tiles * projector_tile_activations(model, layout, roles["projector"])
    head_saved, logits = _head_activations(model, layout, roles["language"])
    out = []
    for r in range(pp):
        first, last = r == 0, r == pp - 1
        pieces = [("language", counts["llm_layer"], layers[r])]
        if first:
            pieces += [
                ("vision", counts["vision"], 1),
                ("projector", counts["projector"], 1),
                ("language", counts["embedding"], 1),
            ]
        if last:
            pieces += [("language", counts["final_norm"], 1), ("language", counts["output_layer"], 1)]
            if tied and pp > 1:
                pieces.append(("language", counts["embedding"], 1))  # the output layer's copy
        params = sum(n * c.per_rank(t) for _, c, n in pieces)
        trained = sum(n * c.per_rank(t) for part, c, n in pieces if part in trainable)
        flight = in_flight_micro_batches(r, layout)
        stage = StageMemory(r, layers[r], params, trained, max(flight))
        stage.weights = params * e
        stage.grads = trained * GRAD_BYTES
        stage.optimizer = (
            trained * state_bytes / (layout.data_parallel if layout.distributed_optimizer else 1)
        )
        per_chunk_llm = layers[r] / vpp * llm_saved
        for chunk, n in enumerate(flight):
            acts = per_chunk_llm
            if first and chunk == 0:
                acts += vit_saved + proj_saved
            if last and chunk == vpp - 1:
                acts += head_saved
                stage.logits += n * logits
            else:
                acts += tokens * model.language.hidden_size * e / sp  # the output sent on (kept for backward)
            stage.activations += n * acts
        stage.parts = {
            "language_layer": llm_saved,
            "vision": vit_saved,
            "projector": proj_saved,
            "head": head_saved if last else 0.0,
            "logits": logits if last else 0.0,
        }
        # one micro-batch's backward, in forward order: ViT layers, projector, LLM layers, head
        segments = []
        if first and vit_trains and tiles:
            vit_layers = model.vision.num_layers_used
            saved, none = vit_saved / vit_layers, vit_none / vit_layers
            work = tiles * _layer_working_set(model, layout, True, saved / tiles, none / tiles)
            segments += [(saved, work)] * vit_layers
        if first:
            segments.append((proj_saved, proj_saved))
        llm_work = (
            _layer_working_set(model, layout, False, llm_saved, llm_none)
            if roles["language"] != "forward"
            else 0.0
        )
        segments += [(llm_saved, llm_work)] * (layers[r] // vpp)
        if last:  # the output layer's weight gradient (before it is added to the fp32 buffer) and dX
            weight_grad = model.language.vocab_size / t if roles["language"] == "trains" else 0.0
            head_work = (tokens / sp + weight_grad) * model.language.hidden_size * e
            segments.append((head_saved + logits, head_work if roles["language"] != "forward" else 0.0))
        stage.transient = _backward_peak(segments)
        stage.inputs = _inputs(model, layout, first, tiles, max(flight))
        if layout.device == "gpu" and not layout.flash_attention:  # megatron's scores buffer (baddbmm input)
            scores = tokens * model.language.num_attention_heads / t * layout.seq_length
            if first and tiles:
                s_v = model.vision.seq_length
                scores = max(scores, tiles * model.vision.num_attention_heads / t * s_v * s_v)
            stage.transient += scores * e
        out.append(stage)
    return out


def _inputs(model: ModelConfig, layout: MemoryLayout, first: bool, tiles: int, in_flight: int) -> float:
    """Bytes of packed micro-batches held: the whole step's on a CPU, the in-flight ones' on a GPU."""
    tokens = layout.micro_batch_size * layout.seq_length
    per_micro_batch = tokens * (3 * 8 + 4)  # ids, labels, positions (int64), loss mask (fp32)
    # bool [b, 1, s, s]: built by the forward step from cu_seqlens, so only in-flight micro-batches hold one
    masks = in_flight * tokens * layout.seq_length if layout.attention_mask else 0
    if layout.device == "cpu":
        if first:
            per_micro_batch += tiles * model.vision.num_channels * model.vision.image_size**2 * 4
        return layout.micro_batches * per_micro_batch + masks
    return in_flight * per_micro_batch + masks


def largest_stage(stages: list[StageMemory]) -> StageMemory:
    """The pipeline rank that needs the most memory."""
    return max(stages, key=lambda s: s.total)


def remedies(layout: MemoryLayout) -> str:
    """What lowers memory per rank from ``layout``, for messages."""
    steps = ["raise parallel.tensor or parallel.pipeline"]
    if not layout.distributed_optimizer and layout.data_parallel > 1:
        steps.append("set parallel.distributed_optimizer=true")
    if layout.recompute != "full":
        steps.append(
            "set train.recompute=" + ("selective (or full)" if layout.recompute == "none" else "full")
        )
    steps.append("lower data.micro_batch_size" if layout.micro_batch_size > 1 else "lower data.seq_length")
    return ", ".join(steps[:-1]) + " or " + steps[-1]
