"""Start-up checks: refuse, before any step, a run whose pieces do not fit together.

Each failure names both sides (config key and value, dataset file and value). Values the config
leaves unset (not in the YAML file or overrides, see ``megasail.config.load_config``) are taken
from the datasets' manifests instead, so ``data.path=PREFIX`` alone works with any tokenizer.
"""

from __future__ import annotations

import json
import logging
import os

from megasail.config import RunConfig
from megasail.data.loader.config import TRAINABLE_MODULES, SourceConfig, StageConfig
from megasail.models.specs import use_transformer_engine

log = logging.getLogger(__name__)

# An unset vocabulary is padded to a multiple of 128, whatever the layout: megatron pads to 128 x TP
# (make_vocab_size_divisible_by), which makes the model (and a TP=2 checkpoint) depend on the TP a
# run started at. Every power-of-two TP up to 128 divides 128, so each rank's shard stays whole.
VOCAB_DIVISOR = 128


class StartupError(ValueError):
    """A setting that cannot work; the message names the key, the other side, and the fix."""


def padded_vocab_size(vocab: int) -> int:
    """The tokenizer's vocabulary rounded up to a multiple of VOCAB_DIVISOR (layout-independent)."""
    return -(-vocab // VOCAB_DIVISOR) * VOCAB_DIVISOR


def resolve_stages(cfg: RunConfig) -> None:
    """``data.path`` becomes a single stage training every module (no budget); both set is refused."""
    if cfg.data.path is None:
        return
    if cfg.data.stages:
        raise StartupError(
            f"data.path={cfg.data.path!r} and data.stages ({len(cfg.data.stages)} stages) are both "
            "set: use data.path for a one-prefix run or data.stages for a curriculum, not both"
        )
    cfg.data.stages = [
        StageConfig(
            name="main",
            sources=[SourceConfig(prefix=cfg.data.path)],
            trainable=["vision", "projector", "language"],
        )
    ]


def _explicit(cfg: RunConfig, key: str) -> bool:
    keys = getattr(cfg, "explicit_keys", None)
    return True if keys is None else key in keys


def read_manifests(cfg: RunConfig) -> dict[str, dict]:
    """PREFIX.manifest.json of every source (training and validation) of every stage, by prefix.
    A prefix without samples is refused (check_source_not_empty)."""
    out = {}
    for stage in cfg.data.stages:
        for source in [*stage.sources, *stage.validation_sources]:
            path = f"{source.prefix}.manifest.json"
            if source.prefix in out:
                continue
            if not os.path.isfile(path):
                raise StartupError(
                    f"data stage {stage.name!r}: {path} not found (a prefix is complete only when "
                    "tools/preprocess_data.py has written its manifest)"
                )
            with open(path, encoding="utf-8") as f:
                out[source.prefix] = json.load(f)
            check_source_not_empty(stage.name, source.prefix, out[source.prefix])
    return out


def check_source_not_empty(stage: str, prefix: str, manifest: dict) -> None:
    """A prefix whose manifest counts 0 samples (every record rejected) cannot be drawn from."""
    if manifest.get("num_samples") != 0:
        return
    from megasail.data.preprocess.rejects import empty_prefix_reason

    raise StartupError(
        f"data stage {stage!r}: source {prefix} holds no samples ({empty_prefix_reason(prefix, manifest)}): "
        "fix its inputs and preprocess it again, or remove it from the stage"
    )


def check_tokenizer(cfg: RunConfig, manifests: dict[str, dict]) -> None:
    """image_token_id, vocabulary and pad id against the datasets' tokenizer; unset values adopted."""
    model, data = cfg.model, cfg.data
    contexts = {p: m.get("image_token_ids", {}).get("img_context") for p, m in manifests.items()}
    distinct = {c for c in contexts.values() if c is not None}
    if len(distinct) > 1:
        raise StartupError(
            f"datasets disagree on the <IMG_CONTEXT> id: {contexts} (made with different tokenizers)"
        )
    if distinct:
        (context,) = distinct
        if context != model.image_token_id:
            if _explicit(cfg, "model.image_token_id"):
                prefix = next(p for p, c in contexts.items() if c == context)
                raise StartupError(
                    f"model.image_token_id={model.image_token_id} but {prefix}.manifest.json has "
                    f"<IMG_CONTEXT> = {context}: set model.image_token_id={context} or use the "
                    "tokenizer the dataset was made with"
                )
            log.info("model.image_token_id=%d from the dataset manifest", context)
            model.image_token_id = context
    vocabs = {
        p: m["tokenizer"]["vocab_size"]
        for p, m in manifests.items()
        if "vocab_size" in m.get("tokenizer", {})
    }
    if vocabs:
        prefix, vocab = max(vocabs.items(), key=lambda kv: kv[1])
        lm = model.language
        if not _explicit(cfg, "model.language.vocab_size"):
            lm.vocab_size = padded_vocab_size(vocab)
            log.info(
                "model.language.vocab_size=%d (tokenizer's %d padded to a multiple of %d)",
                lm.vocab_size,
                vocab,
                VOCAB_DIVISOR,
            )
        elif lm.vocab_size < vocab:
            raise StartupError(
                f"model.language.vocab_size={lm.vocab_size} is smaller than the tokenizer of "
                f"{prefix} ({vocab} tokens): token ids would index past the embedding"
            )
        if data.pad_token_id >= lm.vocab_size or (
            data.pad_token_id >= vocab and not _explicit(cfg, "data.pad_token_id")
        ):
            if _explicit(cfg, "data.pad_token_id"):
                raise StartupError(
                    f"data.pad_token_id={data.pad_token_id} is outside the model vocabulary "
                    f"(model.language.vocab_size={lm.vocab_size})"
                )
            special = manifests[prefix]["tokenizer"].get("special_token_ids", {})
            data.pad_token_id = special.get("<|im_end|>", vocab - 1)
            log.info("data.pad_token_id=%d (<|im_end|> of the dataset tokenizer)", data.pad_token_id)
    if model.image_token_id >= model.language.vocab_size:
        raise StartupError(
            f"model.image_token_id={model.image_token_id} is outside the vocabulary "
            f"(model.language.vocab_size={model.language.vocab_size})"
        )


def check_packing(cfg: RunConfig) -> None:
    """The loader packs several samples per sequence: the layers must keep them apart.

    Transformer Engine reads the batch's cu_seqlens (THD); local layers take the block-causal mask
    the forward step builds from cu_seqlens on the device, which needs model.packed_sequences.
    """
    if use_transformer_engine(cfg.model.transformer_impl):
        return
    if not cfg.model.packed_sequences:
        if _explicit(cfg, "model.packed_sequences"):
            raise StartupError(
                "model.packed_sequences=false with local layers (model.transformer_impl="
                f"{cfg.model.transformer_impl}): packed samples would attend to each other; set "
                "model.packed_sequences=true (block-causal mask) or use Transformer Engine"
            )
        cfg.model.packed_sequences = True


def check_layout(cfg: RunConfig, world_size: int) -> None:
    """TP/PP/DP must divide the world, the model and the batch; the sequence must fit the positions."""
    p, lm, vit, data = cfg.parallel, cfg.model.language, cfg.model.vision, cfg.data
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        raise StartupError(
            f"world size {world_size} is not divisible by parallel.tensor={p.tensor} x "
            f"parallel.pipeline={p.pipeline} x parallel.context={p.context}"
        )
    dp = world_size // model_parallel
    divisible = [
        ("model.language.num_attention_heads", lm.num_attention_heads, "parallel.tensor", p.tensor),
        ("model.language.num_query_groups", lm.num_query_groups, "parallel.tensor", p.tensor),
        ("model.language.ffn_hidden_size", lm.ffn_hidden_size, "parallel.tensor", p.tensor),
        ("model.language.vocab_size", lm.vocab_size, "parallel.tensor", p.tensor),
        ("model.vision.num_attention_heads", vit.num_attention_heads, "parallel.tensor", p.tensor),
        ("model.vision.ffn_hidden_size", vit.ffn_hidden_size, "parallel.tensor", p.tensor),
        ("model.language.hidden_size (projector)", lm.hidden_size, "parallel.tensor", p.tensor),
        (
            "data.global_batch_size",
            data.global_batch_size,
            f"data.micro_batch_size x data-parallel size {dp}",
            data.micro_batch_size * dp,
        ),
    ]
    if p.sequence_parallel:
        divisible.append(
            ("data.seq_length", data.seq_length, "parallel.tensor (sequence_parallel)", p.tensor)
        )
    if p.pipeline > 1:
        chunks = p.pipeline * (p.virtual_pipeline or 1)
        if p.first_stage_llm_layers is None:
            divisible.append(
                ("model.language.num_layers", lm.num_layers, "parallel.pipeline x virtual_pipeline", chunks)
            )
        else:
            rest = lm.num_layers - p.first_stage_llm_layers
            if not 1 <= p.first_stage_llm_layers < lm.num_layers:
                raise StartupError(
                    f"parallel.first_stage_llm_layers={p.first_stage_llm_layers} must lie in "
                    f"1..{lm.num_layers - 1} (model.language.num_layers={lm.num_layers})"
                )
            divisible.append(("layers after the first stage", rest, "parallel.pipeline - 1", p.pipeline - 1))
    for name, value, other, by in divisible:
        if value % by:
            raise StartupError(f"{name}={value} is not divisible by {other}={by}")
    if data.seq_length > lm.max_position_embeddings:
        raise StartupError(
            f"data.seq_length={data.seq_length} exceeds model.language.max_position_embeddings="
            f"{lm.max_position_embeddings}"
        )


def check_stages_train(cfg: RunConfig) -> None:
    """Every stage trains something: an empty ``trainable`` would build an empty optimizer."""
    for index, stage in enumerate(cfg.data.stages):
        if not stage.trainable:
            raise StartupError(
                f"data stage {index} {stage.name!r} trains nothing (its trainable: list is empty or missing): "
                f"add trainable: with any of {list(TRAINABLE_MODULES)}"
            )


def check_fp8(cfg: RunConfig) -> None:
    """FP8 runs in Transformer Engine's layers: refuse it where they are not what gets built."""
    model = cfg.model
    if model.fp8 is not None and not use_transformer_engine(model.transformer_impl):
        reason = (
            "Transformer Engine is not installed (model.transformer_impl=auto builds local layers)"
            if model.transformer_impl == "auto"
            else f"model.transformer_impl={model.transformer_impl}"
        )
        raise StartupError(
            f"model.fp8={model.fp8} needs Transformer Engine layers but {reason}: install "
            "transformer-engine[pytorch] (pip install -e '.[te]') or set model.fp8=null"
        )


def check_memory(cfg: RunConfig, world_size: int) -> None:
    """The largest rank's memory estimate (megasail.models.memory, every curriculum stage) must fit this
    device: free GPU memory, or available host RAM divided by the local ranks on a CPU. Skipped with
    ``train.memory_check=false``."""
    if not cfg.train.memory_check:
        return
    from megasail.training.memory_budget import memory_shortfall  # it imports torch and psutil

    message = memory_shortfall(cfg, world_size)
    if message:
        raise StartupError(message)


def check_run(cfg: RunConfig, world_size: int) -> None:
    """All start-up checks, in order; adopts unset values from the manifests. Raises StartupError."""
    resolve_stages(cfg)
    if not cfg.data.stages:
        raise StartupError("no training data: set data.path=PREFIX or give data.stages")
    try:
        cfg.data.validate()
    except ValueError as e:
        raise StartupError(str(e)) from None
    check_stages_train(cfg)
    try:
        use_transformer_engine(cfg.model.transformer_impl)
    except RuntimeError as e:  # transformer_impl=te without TE
        raise StartupError(f"{e}: install transformer-engine[pytorch] or set model.transformer_impl=auto") from None
    check_fp8(cfg)
    check_tokenizer(cfg, read_manifests(cfg))
    check_packing(cfg)
    check_layout(cfg, world_size)
    try:
        cfg.model.validate()
    except ValueError as e:
        raise StartupError(str(e)) from None
    check_memory(cfg, world_size)
