"""lmms-eval model plugin: ``lmms-eval --model megasail --model_args load=CKPT[,batch_size=8,max_tiles=6]``.

Installed with the ``lmms-eval`` extra (``pip install -e ".[lmms-eval]"``), which registers ``manifest``
under the ``lmms_eval.models`` entry-point group (lmms-eval >= 0.6 reads it when it lists its models).
The model answers ``generate_until`` requests through megasail's own generation path: the checkpoint's
chat template and InternVL tiling, and batches bucketed by tile count and left-padded
(``megasail.inference.batched``), so an answer does not depend on the batch it was generated in.
Log-likelihood requests (multiple choice by likelihood) are not supported.

``LmmsEvalAdapter`` holds everything but the lmms-eval base class, so it works (and is tested)
without lmms-eval installed; ``Megasail`` exists when lmms-eval imports. One process runs one
model replica (tensor parallel 1): lmms-eval splits requests over processes itself.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence

log = logging.getLogger("megasail.lmms_eval")
MODEL_NAME = "megasail"


def manifest():
    """The ``lmms_eval.models`` entry point: megasail's manifest for lmms-eval's model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.Megasail")


def visual_bytes(visual) -> bytes:
    """Encoded image bytes of an lmms-eval visual: a PIL image (PNG, lossless), a file path or bytes."""
    if isinstance(visual, (bytes, bytearray)):
        return bytes(visual)
    if isinstance(visual, (str, os.PathLike)):
        with open(visual, "rb") as f:
            return f.read()
    if hasattr(visual, "save"):  # PIL.Image.Image
        buffer = io.BytesIO()
        visual.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"cannot use a visual of type {type(visual).__name__} (images only: PIL, path or bytes)")


def sampling_from_gen_kwargs(gen_kwargs: dict, default_max_new_tokens: int) -> tuple[dict, list[str]]:
    """(SamplingParams keyword arguments, stop strings) from lmms-eval's generation kwargs.

    Greedy unless do_sample is true with a temperature > 0; num_beams > 1 is not supported (greedy).
    """
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else [u for u in until if u]
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    greedy = not gen_kwargs.get("do_sample", False) or temperature <= 0
    if int(gen_kwargs.get("num_beams") or 1) > 1:
        log.warning("num_beams=%s is not supported: decoding greedily", gen_kwargs["num_beams"])
    params = {
        "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
        "greedy": greedy,
    }
    if not greedy:
        params.update(temperature=temperature, top_p=float(gen_kwargs.get("top_p") or 1.0))
    return params, until


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cut = min((text.find(u) for u in until if u in text), default=-1)
    return text if cut < 0 else text[:cut]


class LmmsEvalAdapter:
    """A megasail checkpoint answering (question, images, generation kwargs) prompts in batches."""

    def __init__(self, load: str, batch_size: int = 8, max_new_tokens: int = 128, tokenizer: str | None = None,
                 template: str | None = None, system: str | None = None, max_tiles: int | None = None,
                 precision: str | None = None, decode_backend: str = "pil", seed: int = 0):  # fmt: skip
        from dataclasses import replace

        from megatron.core import parallel_state

        from megasail import runtime
        from megasail.inference import Generator
        from megasail.inference.loading import load_for_generation

        if not parallel_state.model_parallel_is_initialized():
            runtime.initialize(1, 1, seed=seed)  # a process of `accelerate launch` / torchrun joins its peers
        loaded = load_for_generation(load, tokenizer=tokenizer, precision=precision)
        overrides = {"decode_backend": decode_backend}
        overrides.update({k: v for k, v in (("template", template), ("system_message", system),
                                            ("max_tiles", max_tiles)) if v is not None})  # fmt: skip
        self.prompt = replace(loaded.prompt, **overrides)
        self.tokenizer = loaded.tokenizer
        try:
            pad = self.tokenizer.token_id("<|endoftext|>")
        except KeyError:
            pad = 0
        self.generator = Generator(loaded.model, pad_token_id=pad)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.seed = seed

    def generate(self, prompts: Sequence[tuple[str, Sequence, dict]]) -> list[str]:
        """One answer per (question, visuals, gen_kwargs), in order. Prompts sharing generation kwargs
        are batched together; a prompt whose images cannot be read answers "" (logged)."""
        from megasail.inference import SamplingParams, stop_token_ids
        from megasail.inference.batched import BatchedGenerator, BatchingConfig, WorkItem

        answers: list[str | None] = [None] * len(prompts)
        groups: dict[str, list[int]] = {}
        settings = []
        for index, (_, _, gen_kwargs) in enumerate(prompts):
            settings.append(sampling_from_gen_kwargs(gen_kwargs or {}, self.max_new_tokens))
            groups.setdefault(json.dumps(settings[-1], sort_keys=True), []).append(index)
        for indices in groups.values():
            params, until = settings[indices[0]]
            sampling = SamplingParams(**params, seed=self.seed, stop_token_ids=stop_token_ids(self.tokenizer))
            batched = BatchedGenerator(self.generator, self.tokenizer, self.prompt, sampling,
                                       BatchingConfig(batch_size=self.batch_size))  # fmt: skip
            items = [WorkItem(str(i), prompts[i][0], lambda i=i: [visual_bytes(v) for v in prompts[i][1]], i)
                     for i in indices]  # fmt: skip
            for outcomes in batched.run(items):
                for outcome in outcomes:
                    if outcome.result is None:
                        log.warning("request %d has no answer: %s (%s)", outcome.item.payload, outcome.error_reason,
                                    outcome.error_message)  # fmt: skip
                    answers[outcome.item.payload] = cut_at_stop(outcome.text, until)
        return answers


def _flatten(visuals) -> list:
    out = []
    for visual in visuals or []:
        out.extend(_flatten(visual) if isinstance(visual, (list, tuple)) else [visual])
    return out


try:
    from lmms_eval.api.model import lmms as _LmmsBase
except ImportError:  # lmms-eval not installed: the adapter above still works on its own
    _LmmsBase = None

if _LmmsBase is not None:

    class Megasail(_LmmsBase):
        """lmms-eval's view of a megasail checkpoint: ``--model_args load=CKPT,batch_size=8,...``."""

        is_simple = True

        def __init__(self, load: str, batch_size: int | str = 8, device: str | None = None, **kwargs):
            super().__init__()
            import torch.distributed as dist

            known = ("max_new_tokens", "tokenizer", "template", "system", "max_tiles", "precision",
                     "decode_backend", "seed")  # fmt: skip
            unknown = sorted(set(kwargs) - set(known))
            if unknown:
                log.warning(
                    "ignoring unknown model_args %s (known: load, batch_size, %s)", unknown, ", ".join(known)
                )
            self.adapter = LmmsEvalAdapter(load, batch_size=int(batch_size),
                                           **{k: v for k, v in kwargs.items() if k in known})  # fmt: skip
            self._rank = dist.get_rank()
            self._world_size = dist.get_world_size()

        def generate_until(self, requests) -> list[str]:
            prompts = []
            for context, gen_kwargs, doc_to_visual, doc_id, task, split in (r.args for r in requests):
                visuals = _flatten([doc_to_visual(self.task_dict[task][split][doc_id])])
                prompts.append((context, visuals, dict(gen_kwargs or {})))
            return self.adapter.generate(prompts)

        def loglikelihood(self, requests):
            raise NotImplementedError(
                "the megasail plugin generates answers (generate_until tasks); log-likelihood tasks are not supported"
            )

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("the megasail plugin answers single-round requests only")
