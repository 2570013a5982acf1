"""Validation data (StageConfig.validation_sources): every evaluation reads the same batches, the
training loader is untouched, DP ranks split each validation sample once, TP/PP ranks get their
fields from one reader. Samples are recognised in the batches by their tokens (outside-in)."""

from __future__ import annotations

import copy
import random
from collections import Counter

import numpy as np
import pytest
import torch
from dist_utils import run_distributed_test
from test_loader import write_prefix

from megasail.data.format.reader import IndexedMultimodalDataset
from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
from megasail.data.loader.data_loader import MultimodalDataLoader
from megasail.data.loader.validation import ValidationReader, build_validation_loader

KEYS = ("input_ids", "labels", "loss_mask", "position_ids", "cu_seqlens", "pixel_values", "num_samples")


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation_data")
    return {"train": write_prefix(root / "train", 40, 1), "held_a": write_prefix(root / "held_a", 24, 2),
            "held_b": write_prefix(root / "held_b", 12, 3)}


def make_config(prefixes, weights=(2.0, 1.0), **overrides) -> DataConfig:
    """Stage 'first' (budget 12 samples, no validation), then 'second' with held_a + held_b held out."""
    settings = dict(seq_length=1024, global_batch_size=4, micro_batch_size=1, max_tiles=2, num_workers=0,
                    pack_chunk_samples=12, pack_window=6, decode_backend="pil", seed=11)
    settings.update(overrides)
    held_out = [SourceConfig(prefixes["held_a"], weights[0]), SourceConfig(prefixes["held_b"], weights[1])]
    stages = [StageConfig("first", [SourceConfig(prefixes["train"])], budget_samples=12, trainable=["projector"]),
              StageConfig("second", [SourceConfig(prefixes["train"])], validation_sources=held_out)]
    return DataConfig(stages=stages, **settings)


def evaluation(reader) -> list[list[dict]]:
    """One evaluation from its start: the micro-batch lists of its steps."""
    reader.reset()
    steps = []
    while True:
        try:
            steps.append(reader.next_step())
        except StopIteration:
            return steps


def assert_same_steps(got, want):
    assert len(got) == len(want)
    for step_got, step_want in zip(got, want, strict=True):
        assert len(step_got) == len(step_want)
        for a, b in zip(step_got, step_want, strict=True):
            for key in KEYS:
                assert (a[key] is None and b[key] is None) or torch.equal(a[key], b[key]), key


def sample_counts(steps, prefixes, config) -> Counter:
    """(prefix name, sample index) -> times read, found by matching each packed segment's tokens."""
    by_tokens = {}
    for name in ("held_a", "held_b", "train"):
        ds = IndexedMultimodalDataset(prefixes[name])
        for i in range(len(ds)):
            by_tokens[tuple(ds.expand(i, config.max_tiles).input_ids.tolist())] = (name, i)
    counts = Counter()
    for step in steps:
        for batch in step:
            flat = batch["input_ids"].reshape(-1).tolist()
            bounds = batch["cu_seqlens"].tolist()
            for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
                segment = tuple(flat[lo:hi])
                if set(segment) != {config.pad_token_id}:
                    counts[by_tokens[segment]] += 1  # a KeyError: a segment that is no sample
    return counts


def test_every_evaluation_reads_the_same_batches(prefixes):
    """Three evaluations with 2 workers (the second cut short after one step) read the batches of the
    first, which equal those of a reader built afresh without workers.

    Fault caught: reset() keeping the exhausted iterator (an evaluation continues where the last one
    ended, as megatron's validation iterator does: here the stream has ended and the next is empty)."""
    config = make_config(prefixes, num_workers=2)
    reader = ValidationReader(config, 1, eval_iters=2)
    first = evaluation(reader)
    assert len(first) == 2 == reader.coverage["global_batches"] and not reader.coverage["full_pass"]
    reader.reset()
    reader.next_step()  # an evaluation stopped early by its caller
    assert_same_steps(evaluation(reader), first)
    assert_same_steps(evaluation(reader), first)
    assert_same_steps(evaluation(ValidationReader(make_config(prefixes), 1, eval_iters=2)), first)
    reader.close()


def test_validation_leaves_the_training_loader_alone(prefixes):
    """A training loader gives the same batches and state with a validation reader built and run
    (2 workers) between its steps as alone; a validation pass leaves torch's, numpy's and Python's
    global RNG states as they were.

    Faults caught: the validation DataLoader seeding its workers from torch's global RNG (no private
    generator); validation_data_config editing the training stage in place (the training loader then
    reads the held-out data)."""
    config = make_config(prefixes, num_workers=2)
    alone = MultimodalDataLoader(copy.deepcopy(config))
    train = MultimodalDataLoader(config)
    reader = None
    for step in range(5):  # across the stage boundary, into the stage that has validation data
        assert_same_steps([train.next_step()], [alone.next_step()])
        assert train.state_dict() == alone.state_dict()
        if step == 1:
            reader = ValidationReader(config, 1, eval_iters=2)
        if reader is not None:
            rng = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
            assert len(evaluation(reader)) == 2
            assert torch.equal(torch.get_rng_state(), rng[0])
            assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]
    assert train.current_stage.name == "second"
    reader.close()


@pytest.mark.parametrize("weights,eval_iters", [((2.0, 1.0), 50), ((1.0, 1.0), 50), ((2.0, 1.0), 1)])
def test_dp2_ranks_split_each_validation_sample_once(prefixes, weights, eval_iters):
    """At DP=2 the two ranks' batches of an evaluation hold no sample twice, and `coverage` counts what
    they hold. With eval_iters past the data and weights that follow the sizes (24:12), that is every
    held-out sample once (a full pass, no wrap-around; chunks of 12 blend exactly 2:1); with equal weights the pass ends where the
    smaller source would repeat; with eval_iters 1, one global batch. No training sample appears.

    Faults caught: no budget at the first repeat (the evaluation wraps around: samples read twice);
    the reader ignoring its dp_rank (both ranks read rank 0's rows: each of them twice)."""
    config = make_config(prefixes, weights=weights, num_workers=0)
    readers = [ValidationReader(config, 1, eval_iters, dp_rank, 2) for dp_rank in range(2)]
    steps = [step for reader in readers for step in evaluation(reader)]
    counts = sample_counts(steps, prefixes, config)
    coverage = readers[0].coverage
    assert coverage == readers[1].coverage
    assert set(counts.values()) == {1} and sum(counts.values()) == coverage["samples"]
    assert {name for name, _ in counts} <= {"held_a", "held_b"}
    if eval_iters == 1:
        assert coverage["global_batches"] == 1 and not coverage["full_pass"]
        return
    assert coverage["full_pass"] and coverage["global_batches"] < eval_iters
    if weights == (2.0, 1.0):
        assert len(counts) == 24 + 12 == coverage["one_pass_samples"]
    else:  # held_b (12 samples) would repeat first: about 12 samples of each
        assert sum(1 for name, _ in counts if name == "held_b") == 12 and len(counts) <= 12 + 13


def test_a_stage_without_validation_sources_has_no_loader(prefixes):
    assert build_validation_loader(make_config(prefixes), 0, 3) is None
    with pytest.raises(ValueError, match="no validation_sources"):
        ValidationReader(make_config(prefixes), 0, 3)
    with pytest.raises(ValueError, match="validation_sources entry .* negative weight"):
        make_config(prefixes, weights=(1.0, -1.0)).validate()


def _model_parallel_validation(rank, world_size, prefixes, tp, pp):
    from megasail.data.loader.model_parallel import stage_fields
    from megasail.runtime import initialize

    initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    config = make_config(prefixes)
    loader = build_validation_loader(config, 1, eval_iters=2)
    reference = ValidationReader(config, 1, eval_iters=2)  # what the single reader produces
    assert loader.microbatches_per_step == reference.microbatches_per_step == 4
    is_first, is_last = pp == 1 or rank == 0, pp == 1 or rank == 1
    wanted = set(stage_fields(is_first, is_last))
    want = evaluation(reference)
    for _ in range(2):  # two evaluations: the same steps on every rank
        steps = list(loader)
        assert len(steps) == len(want) == 2
        for step, step_want in zip(steps, want, strict=True):
            for got, expected in zip(step, step_want, strict=True):
                for key, value in got.items():
                    if key in wanted and expected[key] is not None:  # pixel_values: None without images
                        assert value is not None and torch.equal(value, expected[key]), (rank, key)
                    else:
                        assert value is None, (rank, key)
        assert loader.coverage == reference.coverage


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [pytest.param(2, 1, marks=pytest.mark.slow), (1, 2)])
def test_model_parallel_ranks_get_their_validation_fields_from_one_reader(prefixes, tp, pp):
    """TP=2 / PP=2: every rank's validation steps hold exactly its pipeline stage's fields, equal to a
    single reader's, at two evaluations in a row; every rank knows the coverage. (TP=2 is slow-tier:
    its broadcast is the training loader's, tested in test_loader.py; PP=2 runs by default.)

    Fault caught: ModelParallelDataLoader ignoring make_reader (the group's reader is then a training
    MultimodalDataLoader, which has no evaluation to restart)."""
    run_distributed_test(_model_parallel_validation, 2, prefixes, tp, pp)
