"""A run's plan before it starts: GPUs, layout, tokens per step, iterations per stage, estimated days.

    python -m megasail.plan --config examples/configs/sail_vl_2b.yaml --nodes 16 \
        --stage examples/configs/stages/pretrain_alignment.yaml --stage examples/configs/stages/pretrain_advance.yaml \
        data.seq_length=8192 data.global_batch_size=512

Arithmetic (every number printed is one of these):
  gpus            = nodes * gpus_per_node
  dp              = gpus / (tp * pp * cp)
  micro-batches   = global_batch / (micro_batch * dp)          per data-parallel rank per step
  token slots     = global_batch * seq_length                  per optimizer step
  sample tokens   = token slots * packing_efficiency           (padding is not budget)
  iterations      = ceil(budget_tokens / sample tokens)  or  ceil(budget_samples / (global_batch * samples_per_seq))
  step FLOPs      = global_batch * the stage's FLOPs of one packed sequence (below), split by precision
  step seconds    = (bf16 step FLOPs / bf16 peak + fp8 step FLOPs / fp8 peak) / (mfu * gpus)   [default]
                  or sample tokens / (--tokens-per-s-per-gpu * gpus)                            [stated]
  tokens/s        = sample tokens / step seconds               (all GPUs; padding excluded, as metrics.jsonl)
  days            = iterations * step seconds / 86400
  pipeline bubble = (pp - 1) / (vpp * micro-batches + pp - 1)  of a 1F1B step (0 at pp = 1)

Step FLOPs are the training loop's model FLOPs (megasail.models.flops, the MFU numerator), so each
stage's time follows what its own trainable parts cost: a trained part 3x its forward, a frozen one that
gradients flow through 2x (its attention core 3x), a frozen one with nothing trained before it (the ViT
while only the projector trains) 1x; real tokens only, LLM attention causal within each sample. --mfu
(default 0.35, the low end of open VLM trainers) is the share of --gpu's dense peak assumed for every
stage; a measured --tokens-per-s-per-gpu (tools/bench_train.py's tokens/s, sample tokens) replaces it
for every stage instead, and --from-metrics runs/X/metrics.jsonl measures it: the median tokens_per_s of
each stage's steady steps (the first --metrics-skip rows of every stage are left out), divided by the
GPUs of that run (--metrics-gpus); a planned stage the metrics do not name takes the median of all of
them, and the run's packing efficiency (1 - loader padding_fraction) replaces the default one.

Memory per GPU (megasail.models.memory: weights, fp32 gradient buffer and Adam state of what the stage
trains under the distributed optimizer, activations of the micro-batches the 1F1B schedule holds, the
ViT on pipeline stage 0, logits on the last, the backward working set) is printed for every pipeline
rank of every stage; a stage whose largest rank needs more than --memory-fraction of --gpu's memory
(--gpu-memory-gb overrides it) is flagged with what to change. Activations assume Transformer Engine's
flash attention unless model.transformer_impl=local (then the s x s softmax of the unfused core
attention is kept: --attention overrides).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field

from megasail.models import flops, memory
from megasail.models.flops import GPU_PEAKS, Peak, StepFlops


@dataclass
class StagePlan:
    """One curriculum stage: its budget, the steps it takes and how long they last."""

    name: str
    trainable: list[str]
    budget_tokens: int | None
    budget_samples: int | None
    iterations: int
    step_tflops: float  # model FLOPs, whole global batch
    gflops_per_token: float  # step FLOPs per sample token
    step_seconds: float
    tokens_per_s: float  # sample tokens per second over all GPUs
    tokens_per_s_source: str
    days: float
    memory: list[dict] = field(default_factory=list)  # per pipeline rank (memory.StageMemory.gib())
    memory_gib: float = 0.0  # the largest pipeline rank's total
    memory_rank: int = 0
    fits: bool | None = None  # memory_gib within memory_fraction of the GPU (None: GPU memory unknown)


@dataclass
class RunPlan:
    """The layout and the per-stage plan; `format_plan` prints it."""

    model: str
    nodes: int
    gpus_per_node: int
    gpus: int
    tensor: int
    pipeline: int
    virtual_pipeline: int | None
    context: int
    data_parallel: int
    first_stage_llm_layers: int | None
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    micro_batches_per_rank: int
    token_slots_per_step: int
    sample_tokens_per_step: float
    packing_efficiency: float
    tiles_per_sequence: float
    samples_per_sequence: float
    pipeline_bubble: float
    split_suggested: bool = False  # first_stage_llm_layers is the ViT-aware suggestion, not the config's
    recompute: str = "none"
    attention: str = "flash"
    gpu: str = ""
    device: str = "gpu"
    gpu_memory_gib: float | None = None
    memory_fraction: float = 0.9
    remedies: str = ""  # what lowers memory per GPU from this layout
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def total_days(self) -> float:
        return sum(s.days for s in self.stages)

    @property
    def total_iterations(self) -> int:
        return sum(s.iterations for s in self.stages)


def sequence_step_flops(
    model_cfg,
    seq_length: int,
    tiles: float,
    samples: float,
    trainable: list[str],
    packing_efficiency: float = 1.0,
) -> StepFlops:
    """FLOPs a training step spends on one packed sequence, counted as the loop counts them
    (megasail.models.flops): `samples` equal causal samples holding seq_length x packing_efficiency
    real tokens (the rest is padding, which never counts), and `tiles` image tiles."""
    count = max(round(samples), 1)
    lengths = [seq_length * packing_efficiency / count] * count
    return flops.FlopsModel.from_config(model_cfg).step_flops(tiles, lengths, trainable)


def ideal_seconds(step: StepFlops, peak: Peak, gpu: str = "this GPU") -> float:
    """Seconds the step's model FLOPs take on one GPU at 100% of its peaks (FP8 parts at the FP8 peak)."""
    if step.model_fp8 and peak.fp8 is None:
        raise ValueError(f"the run has FP8 parts (model.fp8) but {gpu} has no FP8 peak")
    fp8 = step.model_fp8 / (peak.fp8 * 1e12) if step.model_fp8 else 0.0
    return step.model_bf16 / (peak.bf16 * 1e12) + fp8


def pipeline_bubble(pipeline: int, micro_batches: int, virtual_pipeline: int | None = None) -> float:
    """Idle share of a 1F1B (interleaved with vpp chunks) step: (p - 1) / (v * m + p - 1)."""
    if pipeline == 1:
        return 0.0
    v = virtual_pipeline or 1
    return (pipeline - 1) / (v * micro_batches + pipeline - 1)


@dataclass
class MeasuredThroughput:
    """Sample tokens/s per GPU measured by a run (``read_metrics_throughput``)."""

    path: str
    gpus: int
    by_stage: dict[str, float]  # stage name -> median tokens/s per GPU of its steady steps
    overall: float  # median over every steady step
    steady_steps: int
    packing_efficiency: float | None  # 1 - the loader's padding_fraction at the last row

    def for_stage(self, name: str) -> tuple[float, str]:
        if name in self.by_stage:
            return self.by_stage[name], f"median of {self.path} (stage {name})"
        return self.overall, f"median of {self.path} (all stages)"


def read_metrics_throughput(path: str, gpus: int | None = None, skip: int = 3) -> MeasuredThroughput:
    """Median ``tokens_per_s`` of a metrics.jsonl's steady steps, per GPU: the first ``skip`` rows of
    each stage (start-up, first allocations, a stage's rebuild) are left out; ``gpus`` is the measured
    run's GPU count (rows that record ``world_size`` give it). Raises ValueError naming the file."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(
                    f"{path}:{number}: not a JSON object (a metrics.jsonl of pretrain_vlm.py?)"
                ) from None
            if isinstance(row, dict) and isinstance(row.get("tokens_per_s"), (int, float)):
                rows.append(row)
    if gpus is None:
        gpus = next((int(r["world_size"]) for r in rows if r.get("world_size")), None)
    if gpus is None or gpus < 1:
        raise ValueError(
            f"--from-metrics {path}: give --metrics-gpus N, the GPUs (processes) of the run "
            "that wrote it (its rows do not record a world size)"
        )
    by_stage: dict[str, list[float]] = {}
    seen: dict[str, int] = {}
    for row in rows:
        stage = str(row.get("stage", ""))
        seen[stage] = seen.get(stage, 0) + 1
        if seen[stage] > skip:
            by_stage.setdefault(stage, []).append(float(row["tokens_per_s"]) / gpus)
    steady = [x for values in by_stage.values() for x in values]
    if not steady:
        raise ValueError(
            f"--from-metrics {path}: {len(rows)} step rows, none after the first {skip} of "
            "each stage (lower --metrics-skip or measure more steps)"
        )
    padding = rows[-1].get("loader", {}).get("padding_fraction")
    return MeasuredThroughput(
        path,
        gpus,
        {k: statistics.median(v) for k, v in by_stage.items()},
        statistics.median(steady),
        len(steady),
        1.0 - padding if isinstance(padding, (int, float)) else None,
    )


def make_plan(
    run,
    nodes: int,
    gpus_per_node: int,
    *,
    model_name: str = "",
    tokens_per_s_per_gpu: float | None = None,
    mfu: float = 0.35,
    gpu: str = "H100-SXM",
    peak: Peak | None = None,
    packing_efficiency: float | None = None,
    tiles_per_sequence: float | None = None,
    samples_per_sequence: float | None = None,
    measured: MeasuredThroughput | None = None,
    gpu_memory_gib: float | None = None,
    memory_fraction: float = 0.9,
    attention: str | None = None,
    device: str = "gpu",
) -> RunPlan:
    """The plan of `run` (a RunConfig with data.stages) on nodes x gpus_per_node GPUs.

    tiles_per_sequence defaults to 3/4 of a sequence being image tokens (caption pretraining);
    samples_per_sequence (for sample budgets) defaults to seq_length / 2048 (SFT samples average
    about 2k tokens). Each stage's time is its step FLOPs at `mfu` of `gpu`'s peaks (`peak` overrides
    them), or its sample tokens at a stated tokens_per_s_per_gpu, or at the `measured` throughput (whose
    packing efficiency then replaces the default 0.99 unless one is given). Memory per pipeline rank
    comes from megasail.models.memory against gpu_memory_gib (default: `gpu`'s), `attention` "flash"
    (default unless model.transformer_impl=local) or "unfused", on `device` "gpu" (or "cpu": a CPU run's
    composite RMSNorm and host-resident batches). Raises ValueError when the layout does
    not divide the GPUs or the batch."""
    if packing_efficiency is None:
        measured_packing = measured.packing_efficiency if measured is not None else None
        packing_efficiency = measured_packing or 0.99
    if attention is None:
        attention = "unfused" if run.model.transformer_impl == "local" else "flash"
    if attention not in ("flash", "unfused"):
        raise ValueError(f"attention must be flash or unfused, got {attention!r}")
    if gpu_memory_gib is None and device == "gpu":
        gpu_memory_gib = memory.GPU_MEMORY_GIB.get(gpu)
    p, d = run.parallel, run.data
    gpus = nodes * gpus_per_node
    dp = _data_parallel_size(run, nodes, gpus_per_node)
    if not d.stages:
        raise ValueError("no stages: give data.stages in the config or --stage FILE")
    if peak is None and gpu not in GPU_PEAKS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {sorted(GPU_PEAKS)} or give its peak")
    peak = peak or GPU_PEAKS[gpu]
    micro_batches = d.global_batch_size // (d.micro_batch_size * dp)
    slots = d.global_batch_size * d.seq_length
    sample_tokens = slots * packing_efficiency
    tiles = (
        tiles_per_sequence
        if tiles_per_sequence is not None
        else 0.75 * d.seq_length / run.model.tokens_per_tile
    )
    per_seq = samples_per_sequence if samples_per_sequence is not None else d.seq_length / 2048
    first = p.first_stage_llm_layers
    if first is None and p.pipeline > 1:
        first = flops.suggest_first_stage_layers(
            run.model, p.pipeline, d.seq_length, tiles, p.virtual_pipeline
        )
    plan = RunPlan(
        model=model_name,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        gpus=gpus,
        tensor=p.tensor,
        pipeline=p.pipeline,
        virtual_pipeline=p.virtual_pipeline,
        context=p.context,
        data_parallel=dp,
        first_stage_llm_layers=first,
        seq_length=d.seq_length,
        micro_batch_size=d.micro_batch_size,
        global_batch_size=d.global_batch_size,
        micro_batches_per_rank=micro_batches,
        token_slots_per_step=slots,
        sample_tokens_per_step=sample_tokens,
        packing_efficiency=packing_efficiency,
        tiles_per_sequence=tiles,
        samples_per_sequence=per_seq,
        pipeline_bubble=pipeline_bubble(p.pipeline, micro_batches, p.virtual_pipeline),
        split_suggested=p.first_stage_llm_layers is None and first is not None,
        recompute=run.train.recompute,
        attention=attention,
        gpu=gpu,
        device=device,
        gpu_memory_gib=gpu_memory_gib,
        memory_fraction=memory_fraction,
    )
    # memory follows the split the run will use: parallel.first_stage_llm_layers, else even
    layout = memory.MemoryLayout.from_run(run, dp, tiles, flash_attention=attention == "flash", device=device)
    plan.remedies = memory.remedies(layout)
    for stage in d.stages:
        iterations = _stage_iterations(run, stage, plan, sample_tokens, per_seq)
        per_sequence = sequence_step_flops(
            run.model, d.seq_length, tiles, per_seq, stage.trainable, packing_efficiency
        )
        step = StepFlops(*(d.global_batch_size * x for x in per_sequence.as_tuple()))
        seconds, source = _step_seconds(
            stage.name, step, sample_tokens, gpus, measured, tokens_per_s_per_gpu, mfu, gpu, peak
        )
        days = iterations * seconds / 86400
        plan.stages.append(
            StagePlan(
                stage.name,
                list(stage.trainable),
                stage.budget_tokens,
                stage.budget_samples,
                iterations,
                step.model / 1e12,
                step.model / sample_tokens / 1e9,
                seconds,
                sample_tokens / seconds,
                source,
                days,
            )
        )
        _add_stage_memory(plan.stages[-1], run, layout, stage, gpu_memory_gib, memory_fraction)
    return plan


def _step_seconds(
    name: str,
    step: StepFlops,
    sample_tokens: float,
    gpus: int,
    measured,
    tokens_per_s_per_gpu,
    mfu,
    gpu,
    peak,
) -> tuple[float, str]:
    """Seconds per optimizer step of stage `name` and where the figure comes from: the measured
    throughput, a stated tokens/s, else the step's own FLOPs at `mfu` of the peaks."""
    if measured is not None:
        rate, source = measured.for_stage(name)
        return sample_tokens / (rate * gpus), f"{rate:,.0f} tokens/s per GPU, {source}"
    if tokens_per_s_per_gpu is not None:
        return (
            sample_tokens / (tokens_per_s_per_gpu * gpus),
            f"stated {tokens_per_s_per_gpu:,.0f} tokens/s per GPU",
        )
    fp8 = f" / {peak.fp8:g} FP8" if step.model_fp8 else ""
    return ideal_seconds(step, peak, gpu) / (
        mfu * gpus
    ), f"MFU {mfu:.0%} of {gpu} ({peak.bf16:g} bf16{fp8} TFLOP/s)"


def _data_parallel_size(run, nodes: int, gpus_per_node: int) -> int:
    """The DP size of `run` on nodes x gpus_per_node GPUs; ValueError when the layout or batch does not divide."""
    p, d = run.parallel, run.data
    gpus = nodes * gpus_per_node
    model_parallel = p.tensor * p.pipeline * p.context
    if gpus % model_parallel:
        raise ValueError(
            f"{gpus} GPUs ({nodes} nodes x {gpus_per_node}) do not divide into tensor {p.tensor} x "
            f"pipeline {p.pipeline} x context {p.context} = {model_parallel}"
        )
    dp = gpus // model_parallel
    if d.global_batch_size % (d.micro_batch_size * dp):
        raise ValueError(
            f"data.global_batch_size {d.global_batch_size} is not divisible by data.micro_batch_size "
            f"{d.micro_batch_size} x data-parallel size {dp}"
        )
    return dp


def _stage_iterations(run, stage, plan: RunPlan, sample_tokens: float, per_seq: float) -> int:
    """Optimizer steps of `stage`: its token or sample budget, else what train.iters leaves after the
    stages planned so far (as the loop runs it)."""
    if stage.budget_tokens is not None:
        return math.ceil(stage.budget_tokens / sample_tokens)
    if stage.budget_samples is not None:
        return math.ceil(stage.budget_samples / (run.data.global_batch_size * per_seq))
    if run.train.iters is not None:
        return max(run.train.iters - sum(s.iterations for s in plan.stages), 0)
    raise ValueError(
        f"stage {stage.name!r} has no budget: a plan needs budget_tokens, budget_samples or train.iters"
    )


def _add_stage_memory(entry: StagePlan, run, layout, stage, gpu_memory_gib, memory_fraction: float) -> None:
    """Memory per pipeline rank of `stage` onto its plan entry, the largest rank, and whether it fits."""
    ranks = memory.stage_memory(run.model, layout, list(stage.trainable))
    largest = memory.largest_stage(ranks)
    entry.memory = [r.gib() for r in ranks]
    entry.memory_gib, entry.memory_rank = largest.total / memory.GIB, largest.pp_rank
    if gpu_memory_gib is not None:
        entry.fits = entry.memory_gib <= memory_fraction * gpu_memory_gib


def format_plan(plan: RunPlan) -> str:
    """Human-readable plan: layout lines, then one table row per stage."""
    vpp = f", VPP={plan.virtual_pipeline}" if plan.virtual_pipeline else ""
    split = ""
    if plan.first_stage_llm_layers:
        split = f", first stage LLM layers={plan.first_stage_llm_layers}"
        if plan.split_suggested:
            split += (
                f" (suggested: set parallel.first_stage_llm_layers={plan.first_stage_llm_layers}; memory "
                "below is for the even split the config gives)"
            )
    lines = [
        f"plan: {plan.model or 'model'} on {plan.gpus} GPUs ({plan.nodes} nodes x {plan.gpus_per_node})",
        f"  layout: TP={plan.tensor}, PP={plan.pipeline}{vpp}, CP={plan.context}, DP={plan.data_parallel}{split}",
        f"  batch: {plan.global_batch_size} sequences x {plan.seq_length} tokens = {plan.token_slots_per_step:,} "
        f"token slots per step ({plan.sample_tokens_per_step:,.0f} sample tokens at packing efficiency "
        f"{plan.packing_efficiency}); micro-batch {plan.micro_batch_size}, {plan.micro_batches_per_rank} "
        f"micro-batches per DP rank; pipeline bubble {plan.pipeline_bubble:.1%}",
        f"  FLOPs assume {plan.tiles_per_sequence:g} image tiles per sequence; sample budgets assume "
        f"{plan.samples_per_sequence:g} samples per sequence",
        "",
        "| stage | trains | budget | iterations | TFLOP/step | GFLOP/token | step s | tokens/s (all GPUs) "
        "| days | time from | GiB/GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in plan.stages:
        if s.budget_tokens is not None:
            budget = f"{s.budget_tokens:,} tokens"
        else:
            budget = f"{s.budget_samples:,} samples" if s.budget_samples is not None else "train.iters"
        flag = " DOES NOT FIT" if s.fits is False else ""
        lines.append(
            f"| {s.name} | {'+'.join(s.trainable) or '-'} | {budget} | {s.iterations:,} | "
            f"{s.step_tflops:,.0f} | {s.gflops_per_token:.2f} | {s.step_seconds:.2f} | "
            f"{s.tokens_per_s:,.0f} | {s.days:.2f} | {s.tokens_per_s_source} | {s.memory_gib:.1f}{flag} |"
        )
    lines.append(f"| total | | | {plan.total_iterations:,} | | | | | {plan.total_days:.2f} | | |")
    return "\n".join(lines + [""] + format_memory(plan))


def format_memory(plan: RunPlan) -> list[str]:
    """The memory table (GiB per GPU, every pipeline rank of every stage) and a line per stage that
    does not fit."""
    where = "GPU" if plan.device == "gpu" else "CPU process"
    if plan.gpu_memory_gib:
        name = plan.gpu if plan.device == "gpu" else "budget"
        budget = f"{name} {plan.gpu_memory_gib:g} GiB, flagged above {plan.memory_fraction:.0%}"
    else:
        budget = "no budget: give --gpu-memory-gb"
    extra = (
        "the CUDA context, NCCL buffers and fragmentation (1-3 GiB) come on top"
        if plan.device == "gpu"
        else "the interpreter and libraries (about 0.6 GiB per process) come on top"
    )
    lines = [
        f"memory per {where} in GiB ({budget}; megasail.models.memory): {plan.micro_batch_size} x "
        f"{plan.seq_length} tokens per micro-batch, recompute={plan.recompute}, {plan.attention} attention, "
        f"distributed optimizer over DP={plan.data_parallel}; {extra}",
        "",
        "| PP rank | stage | params | weights | grads | optimizer | activations (micro-batches) | logits "
        "| inputs | backward | total |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in plan.stages:
        for m in s.memory:
            mark = " *" if m["pp_rank"] == s.memory_rank and len(s.memory) > 1 else ""
            cells = [f"{m['pp_rank']}{mark}", s.name, f"{m['params'] / 1e9:.3f}B"]
            cells += [f"{m[k + '_gib']:.2f}" for k in ("weights", "grads", "optimizer")]
            cells.append(f"{m['activations_gib']:.2f} ({m['in_flight']})")
            cells += [f"{m[k + '_gib']:.2f}" for k in ("logits", "inputs", "transient", "total")]
            lines.append("| " + " | ".join(cells) + " |")
    if plan.stages and len(plan.stages[0].memory) > 1:
        lines.append("(* the pipeline rank that needs the most)")
    for s in plan.stages:
        if s.fits is False:
            lines.append(
                f"WARNING: stage {s.name} needs {s.memory_gib:.1f} GiB on pipeline rank {s.memory_rank}, "
                f"more than {plan.memory_fraction:.0%} of {plan.gpu_memory_gib:g} GiB: {plan.remedies}"
            )
    return lines


def compose_config_yaml(
    config: str,
    stage_files: list[str],
    overrides: list[str],
    *,
    all_sources: str | None = None,
    budget_samples: int | None = None,
    init_checkpoint: str | None = None,
) -> str:
    """YAML of a run: the config file, the overrides, and data.stages from stage YAMLs (in order).

    Only keys the file, the overrides or the stages state are written, so values left unset stay
    unset and pretrain_vlm.py's start-up checks still take them from the dataset manifests.
    all_sources replaces every stage's sources with that one prefix, and budget_samples every stage's
    budget (samples, no token budget): smoke runs of a real curriculum on synthetic data.
    init_checkpoint starts the first stage from another run's weights (fresh optimizer and schedule)."""
    from omegaconf import OmegaConf

    raw = OmegaConf.load(config)
    for item in overrides:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist([item]))
    stages = [OmegaConf.to_container(OmegaConf.load(f)) for f in stage_files]
    if not stages:
        stages = OmegaConf.to_container(raw).get("data", {}).get("stages", [])
    for stage in stages:
        if all_sources is not None:
            stage["sources"] = [{"prefix": all_sources, "weight": 1.0, "name": stage.get("name")}]
        if budget_samples is not None:
            stage["budget_tokens"], stage["budget_samples"] = None, budget_samples
    if init_checkpoint is not None and stages:
        stages[0]["init_checkpoint"] = init_checkpoint
    if stages:
        raw = OmegaConf.merge(raw, OmegaConf.create({"data": {"stages": []}}))
        raw.data.stages = stages
    return OmegaConf.to_yaml(raw)


def compose_run_config(config: str, stage_files: list[str], overrides: list[str], **kwargs):
    """The RunConfig that `compose_config_yaml` describes (checked against the schema)."""
    import tempfile

    from megasail.config import load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(compose_config_yaml(config, stage_files, overrides, **kwargs))
        f.flush()
        return load_config(f.name)


def _parse_peak(text: str | None) -> Peak | None:
    if text is None:
        return None
    values = text.split(",")
    try:
        if len(values) > 2:
            raise ValueError
        return Peak(float(values[0]), float(values[1]) if len(values) == 2 else None)
    except ValueError:
        raise ValueError(f"--peak-tflops {text!r}: give BF16 or BF16,FP8 TFLOP/s, e.g. 989,1979") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n", 4)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", required=True, help="run config YAML (model, parallel, data)")
    ap.add_argument(
        "--stage", action="append", default=[], help="stage YAML, in order (replaces data.stages)"
    )
    ap.add_argument("--nodes", type=int, default=1, help="nodes in the job")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    ap.add_argument("--model-name", default="", help="name printed in the plan's first line")
    ap.add_argument(
        "--tokens-per-s-per-gpu",
        type=float,
        default=None,
        help="measured sample tokens/s per GPU (tools/bench_train.py) for every stage, instead of --mfu",
    )
    ap.add_argument(
        "--mfu",
        type=float,
        default=0.35,
        help="model FLOPs utilisation assumed for every stage: each stage's time is its own step FLOPs "
        "at this share of --gpu's peak (default 0.35)",
    )
    ap.add_argument(
        "--gpu",
        default="H100-SXM",
        choices=sorted(GPU_PEAKS),
        help="GPU whose dense bf16/FP8 peaks (megasail.models.flops.GPU_PEAKS) the MFU applies to",
    )
    ap.add_argument(
        "--peak-tflops",
        default=None,
        help="dense peak per GPU instead of --gpu's: BF16 or BF16,FP8 TFLOP/s (e.g. 989,1979)",
    )
    ap.add_argument(
        "--from-metrics",
        default=None,
        metavar="METRICS_JSONL",
        help="time every stage at the measured throughput of this metrics.jsonl (median tokens_per_s of each "
        "stage's steady steps per GPU) instead of --mfu",
    )
    ap.add_argument(
        "--metrics-gpus", type=int, default=None, help="GPUs (processes) of the run that wrote --from-metrics"
    )
    ap.add_argument(
        "--metrics-skip",
        type=int,
        default=3,
        help="first rows of each stage --from-metrics leaves out (default 3)",
    )
    ap.add_argument(
        "--packing-efficiency",
        type=float,
        default=None,
        help="sample tokens per token slot (default 0.99, docs/loader.md measures 0.995-0.999; with "
        "--from-metrics: the measured run's)",
    )
    ap.add_argument(
        "--gpu-memory-gb",
        type=float,
        default=None,
        help="memory per GPU in GiB instead of --gpu's ("
        + ", ".join(f"{k} {v:g}" for k, v in memory.GPU_MEMORY_GIB.items())
        + ")",
    )
    ap.add_argument(
        "--memory-fraction",
        type=float,
        default=0.9,
        help="flag a stage whose estimate exceeds this share of the GPU's memory (default 0.9)",
    )
    ap.add_argument(
        "--device",
        choices=("gpu", "cpu"),
        default="gpu",
        help="memory of a GPU run (default) or of CPU processes (tiny runs: host-resident batches)",
    )
    ap.add_argument(
        "--attention",
        choices=("flash", "unfused"),
        default=None,
        help="core attention the memory estimate assumes (default: flash; unfused with "
        "model.transformer_impl=local)",
    )
    ap.add_argument("--tiles-per-sequence", type=float, default=None, help="image tiles per packed sequence")
    ap.add_argument(
        "--samples-per-sequence", type=float, default=None, help="samples per packed sequence (SFT)"
    )
    ap.add_argument(
        "--all-sources", default=None, help="replace every stage's sources with this prefix (smoke runs)"
    )
    ap.add_argument(
        "--budget-samples", type=int, default=None, help="replace every stage's budget (smoke runs)"
    )
    ap.add_argument(
        "--write-config", default=None, help="write the composed config here (for pretrain_vlm.py)"
    )
    ap.add_argument(
        "--no-plan", action="store_true", help="with --write-config: skip the plan (one-node runs)"
    )
    ap.add_argument("--init-checkpoint", default=None, help="the first stage starts from these weights only")
    ap.add_argument("--json", action="store_true", help="print the plan as one JSON object after the table")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.global_batch_size=512")
    return ap


def _run_plan(args) -> RunPlan | None:
    """The plan the parsed arguments ask for (None with --no-plan), after writing --write-config."""
    composed = dict(
        all_sources=args.all_sources,
        budget_samples=args.budget_samples,
        init_checkpoint=args.init_checkpoint,
    )
    run = compose_run_config(args.config, args.stage, args.overrides, **composed)
    if run.data.path is not None and not run.data.stages:
        from megasail.training.checks import resolve_stages  # data.path: one stage training everything

        resolve_stages(run)
    if args.write_config:
        with open(args.write_config, "w") as f:
            f.write(compose_config_yaml(args.config, args.stage, args.overrides, **composed))
    if args.no_plan:
        return None
    measured = None
    if args.from_metrics and args.tokens_per_s_per_gpu is not None:
        raise ValueError("give --from-metrics or --tokens-per-s-per-gpu, not both")
    if args.from_metrics:
        measured = read_metrics_throughput(args.from_metrics, args.metrics_gpus, args.metrics_skip)
    return make_plan(
        run,
        args.nodes,
        args.gpus_per_node,
        model_name=args.model_name,
        tokens_per_s_per_gpu=args.tokens_per_s_per_gpu,
        mfu=args.mfu,
        gpu=args.gpu,
        peak=_parse_peak(args.peak_tflops),
        packing_efficiency=args.packing_efficiency,
        tiles_per_sequence=args.tiles_per_sequence,
        samples_per_sequence=args.samples_per_sequence,
        measured=measured,
        gpu_memory_gib=args.gpu_memory_gb,
        memory_fraction=args.memory_fraction,
        attention=args.attention,
        device=args.device,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)

    from megasail.config import ConfigError

    try:
        plan = _run_plan(args)
        if plan is None:
            return 0
    except (ConfigError, ValueError, OSError) as e:  # StartupError is a ValueError
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    if args.json:
        print(
            json.dumps(
                {**asdict(plan), "total_days": plan.total_days, "total_iterations": plan.total_iterations}
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
