"""megasail.inference.batched: bucketed batches equal one-at-a-time generation, retries, and TP/PP groups."""

from __future__ import annotations

import pytest
import torch
from chat_utils import png_bytes
from dist_utils import run_distributed_test
from recaption_utils import SIZES, captioning_hf_model, captioning_model_dir

NEW = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(captioning_model_dir(tmp_path_factory.mktemp("batched") / "model"))


def _items(flaky_state: dict):
    """10 images of 1-5 tiles, a corrupt one, and one whose first read fails (then succeeds)."""
    from megasail.inference.batched import ImageReadError, WorkItem

    items = [WorkItem(f"i{k}", "Describe it.", lambda k=k: [png_bytes(*SIZES[k % len(SIZES)], seed=k)])
             for k in range(10)]  # fmt: skip
    items.insert(3, WorkItem("corrupt", "Describe it.", lambda: [png_bytes(50, 50)[:70]]))

    def flaky():
        flaky_state["reads"] = flaky_state.get("reads", 0) + 1
        if flaky_state["reads"] == 1:
            raise ImageReadError("image_unreadable", "transient read error")
        return [png_bytes(40, 40, seed=99)]

    items.insert(6, WorkItem("flaky", "What is this?", flaky))
    return items


def _batched(model_dir, batch_size=4, bucket=True, prefetch=2):
    from megasail.inference import Generator, SamplingParams, stop_token_ids
    from megasail.inference.batched import BatchedGenerator, BatchingConfig
    from megasail.inference.loading import load_for_generation

    loaded = load_for_generation(model_dir)
    params = SamplingParams(max_new_tokens=NEW, stop_token_ids=stop_token_ids(loaded.tokenizer))
    generator = Generator(loaded.model, pad_token_id=loaded.tokenizer.token_id("<|endoftext|>"))
    config = BatchingConfig(batch_size=batch_size, bucket=bucket, prefetch_batches=prefetch)
    return BatchedGenerator(generator, loaded.tokenizer, loaded.prompt, params, config), loaded


def _run(batched, items, gaps: dict | None = None):
    batches = []
    for batch in batched.run(items):
        batches.append([(o.item.id, o.result.token_ids if o.result else o.error_reason, o.tiles, o.attempts)
                        for o in batch])  # fmt: skip
        if gaps is not None:
            gaps.update({o.item.id: o.result.logit_gaps for o in batch if o.result})
    return batches


def _single(rank, world_size, model_dir, out_path):
    """One process: the checks of the test below, then the outcomes saved for the TP/PP test."""
    from megasail import runtime
    from megasail.inference import Request, build_prompt

    runtime.initialize(1, 1)
    batched, loaded = _batched(model_dir)
    gaps: dict = {}
    batches = _run(batched, _items({}), gaps)
    outcomes = {item_id: (result, tiles, attempts) for batch in batches for item_id, result, tiles, attempts in batch}
    assert sorted(outcomes) == sorted(["corrupt", "flaky"] + [f"i{k}" for k in range(10)])
    assert outcomes["corrupt"][0] == "image_corrupt" and outcomes["corrupt"][2] == 2
    assert outcomes["flaky"][2] == 2 and isinstance(outcomes["flaky"][0], list)
    full = [b for b in batches if len(b) == 4]
    assert full and len({tiles for _, _, tiles, _ in full[0]}) == 1, batches
    for k in range(10):
        data = png_bytes(*SIZES[k % len(SIZES)], seed=k)
        ids, pixels = build_prompt(loaded.tokenizer, loaded.prompt, "Describe it.", [data])
        alone = batched.generator.generate([Request(ids, pixels)], batched.params)[0].token_ids
        assert outcomes[f"i{k}"][0] == alone, k
    torch.save((outcomes, gaps), out_path)


@pytest.fixture(scope="module")
def single_outcomes(model_dir, tmp_path_factory):
    out_path = str(tmp_path_factory.mktemp("single") / "outcomes.pt")
    run_distributed_test(_single, 1, model_dir, out_path)
    return out_path


def test_bucketed_batches_equal_one_at_a_time_and_failures_retry_once(single_outcomes):
    """Items generated in tile-count buckets of 4 get exactly the tokens of one-by-one generation; a
    full batch holds one tile count; an item whose read fails once is generated on its retry
    (attempts 2); a corrupt image ends as an outcome with its reason after two attempts; every item
    comes out once (checked in ``_single``).

    Fault caught: bucketing off (planted: every item in key 0 -> the first full batch mixes 1- and
    3-tile images), and no retry (planted: retry_failed ignored -> 'flaky' rejected on its first
    failure)."""
    assert len(torch.load(single_outcomes)[0]) == 12


def _parallel(rank, world_size, model_dir, expected_path, tp, pp):
    from megasail import runtime

    runtime.initialize(tp, pp)
    batched, _ = _batched(model_dir)
    items = _items({})[:7] if batched.is_source else None  # the corrupt and the flaky image among them
    gaps: dict = {}
    batches = _run(batched, items, gaps)
    if batched.is_source:
        outcomes = {i: (r, t, a) for batch in batches for i, r, t, a in batch}
        expected, expected_gaps = torch.load(expected_path)
        assert outcomes == {i: expected[i] for i in outcomes} and len(outcomes) == 7
        for item_id in outcomes.keys() & expected_gaps.keys():  # the last stage's gaps reach the first
            item_gaps = expected_gaps[item_id]
            torch.testing.assert_close(torch.tensor(gaps[item_id]), torch.tensor(item_gaps), rtol=1e-4, atol=1e-4)
    else:
        assert batches == []  # only the group's first rank yields outcomes


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_tensor_and_pipeline_groups_generate_the_same_outcomes(model_dir, single_outcomes, tp, pp):
    """At TP=2 and PP=2 the group's first rank reads, decodes and sends each batch; the group's
    outcomes equal the single-process ones.

    Fault caught: pixels not sent to the other TP rank (planted: _share skipping the pixel broadcast
    -> the group hangs or fails on the missing image embeddings), and token ids sent in another
    order (planted: the batch reversed on receiving ranks -> other tokens)."""
    run_distributed_test(_parallel, tp * pp, model_dir, single_outcomes, tp, pp)


def test_logit_gaps_equal_transformers_scores(model_dir):
    """GenerationResult.logit_gaps holds, per generated token, the top logit minus the runner-up,
    equal to transformers' generate scores on the same prompt (the near-tie signal evaluation uses).

    Fault caught: the gap of the wrong position (planted: gaps appended one step late -> the first
    gap missing and the rest shifted)."""
    from megasail import runtime
    from megasail.inference import Request, build_prompt

    runtime.initialize(1, 1)
    try:
        batched, loaded = _batched(model_dir)
        ids, pixels = build_prompt(loaded.tokenizer, loaded.prompt, "Describe it.", [png_bytes(120, 60, seed=3)])
        result = batched.generator.generate([Request(ids, pixels)], batched.params)[0]
    finally:
        runtime.destroy()
    hf = captioning_hf_model()
    out = hf.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, do_sample=False, max_new_tokens=NEW,
                      eos_token_id=list(batched.params.stop_token_ids), pad_token_id=0, output_scores=True,
                      return_dict_in_generate=True)  # fmt: skip
    top2 = torch.stack([s[0].topk(2).values for s in out.scores])
    assert out.sequences[0, len(ids):].tolist() == result.token_ids
    assert len(result.logit_gaps) == len(result.token_ids)
    torch.testing.assert_close(torch.tensor(result.logit_gaps), top2[:, 0] - top2[:, 1], rtol=1e-4, atol=1e-4)
