"""SailVLModel behaviour: packed sequences, text-only micro-batches, tensor parallel."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed_test
from model_utils import multimodal_batch, shard_state_dict, tiny_hf_model, tiny_model_config

from megasail.convert.hf_internvl import hf_to_megasail


def _model(config, seed=0):
    from megasail.models.sail_vl import SailVLModel

    model = SailVLModel(config)
    model.load_state_dict(hf_to_megasail(tiny_hf_model(config.vision.select_layer, seed=seed).state_dict(), config))
    return model


@pytest.fixture(scope="module")
def megatron_tp1():
    from megasail import runtime

    runtime.initialize(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    yield
    runtime.destroy()


def _sample(config, length, tiles, seed):
    """One sample: ids [length], labels [length] (next token; last one arbitrary), pixels [tiles, ...]."""
    ids, _, pixels = multimodal_batch(config, tiles_per_image=(tiles,), seq_length=length + 1, batch=1, seed=seed)
    ids = ids[0]
    return ids[:-1], ids[1:], pixels[:tiles]


def test_packed_sequence_equals_samples_run_alone(megatron_tp1):
    config = tiny_model_config(-1, packed_sequences=True)
    model = _model(config).eval()
    samples = [_sample(config, 30, 1, 1), _sample(config, 40, 0, 2), _sample(config, 26, 1, 3)]

    alone = []
    for ids, labels, pixels in samples:
        positions = torch.arange(len(ids))[None]
        with torch.no_grad():
            alone.append(model(ids[None], positions, pixels if len(pixels) else None, labels=labels[None])[0])

    ids = torch.cat([s[0] for s in samples])[None]
    labels = torch.cat([s[1] for s in samples])[None]
    pixels = torch.cat([s[2] for s in samples if len(s[2])])
    positions = torch.cat([torch.arange(len(s[0])) for s in samples])[None]  # restart per sample
    sample_id = torch.cat([torch.full((len(s[0]),), i) for i, s in enumerate(samples)])
    causal = torch.ones(len(sample_id), len(sample_id), dtype=torch.bool).tril()
    mask = ~(causal & (sample_id[:, None] == sample_id[None, :]))  # True = masked out
    with torch.no_grad():
        packed = model(ids, positions, pixels, attention_mask=mask[None, None], labels=labels)[0]

    reference = torch.cat(alone)
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.mean(), reference.mean(), rtol=1e-5, atol=0)
    # without the block mask the later samples see the earlier ones: the test can fail
    with torch.no_grad():
        leaky = model(ids, positions, pixels, labels=labels)[0]
    assert (leaky[40:] - reference[40:]).abs().max() > 1e-3


def test_text_only_micro_batch_touches_every_vision_parameter(megatron_tp1):
    config = tiny_model_config(-1)
    model = _model(config).train()
    ids, positions, _ = multimodal_batch(config, tiles_per_image=(0, 0))
    model(ids, positions, None, labels=ids).mean().backward()
    for name, param in list(model.vision_model.named_parameters()) + list(model.projector.named_parameters()):
        assert param.grad is not None, name
        assert torch.count_nonzero(param.grad) == 0, name
    assert model.language_model.output_layer.weight.grad.abs().sum() > 0

    model.zero_grad()
    ids, positions, pixels = multimodal_batch(config, tiles_per_image=(1, 2))
    model(ids, positions, pixels, labels=ids).mean().backward()
    assert model.vision_model.patch_embedding.weight.grad.abs().sum() > 0


def test_context_tokens_without_pixels_is_an_error(megatron_tp1):
    config = tiny_model_config(-1)
    model = _model(config)
    ids, positions, _ = multimodal_batch(config, tiles_per_image=(1, 0))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids, positions, None)


def _tensor_parallel_matches_transformers(rank, world_size, sequence_parallel):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megasail import runtime
    from megasail.config import ParallelConfig
    from megasail.models.sail_vl import SailVLModel

    runtime.initialize(tensor_model_parallel_size=world_size)
    parallel = ParallelConfig(tensor=world_size, sequence_parallel=sequence_parallel)
    config = tiny_model_config(-1)
    hf = tiny_hf_model(-1)
    full = hf_to_megasail(hf.state_dict(), config)
    model = SailVLModel(config, parallel).eval()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    model.load_state_dict(shard_state_dict(full, config, tp_rank=tp_rank, tp_size=world_size), strict=True)
    ids, positions, pixels = multimodal_batch(config, tiles_per_image=(1, 3))
    with torch.no_grad():
        expected = hf(input_ids=ids, pixel_values=pixels).logits
        logits = gather_from_tensor_model_parallel_region(model(ids, positions, pixels))
    assert (logits - expected).abs().max() < 1e-4


@pytest.mark.distributed
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_2_matches_transformers(sequence_parallel):
    run_distributed_test(_tensor_parallel_matches_transformers, 2, sequence_parallel)


def _pipeline_parallel_matches_transformers(rank, world_size):
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megasail import runtime
    from megasail.config import ParallelConfig
    from megasail.models.sail_vl import SailVLModel

    runtime.initialize(pipeline_model_parallel_size=world_size)
    config = tiny_model_config(-1)
    hf = tiny_hf_model(-1)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    model = SailVLModel(config, ParallelConfig(pipeline=world_size), pre_process=pp_rank == 0,
                        post_process=pp_rank == world_size - 1).eval()
    full = hf_to_megasail(hf.state_dict(), config)
    model.load_state_dict(shard_state_dict(full, config, pp_rank=pp_rank, pp_size=world_size), strict=True)
    assert (model.vision_model is not None) == (pp_rank == 0)
    ids, positions, pixels = multimodal_batch(config, tiles_per_image=(1, 3))
    labels = ids.roll(-1, dims=1)

    def forward_step(data_iterator, chunk):
        output = chunk(ids, positions, pixels, labels=labels)
        return output, lambda loss_bs: (loss_bs.sum(), {"loss_bs": loss_bs.detach()})

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
            seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True)
    if parallel_state.is_pipeline_last_stage():
        with torch.no_grad():
            logits = hf(input_ids=ids, pixel_values=pixels).logits
        expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
        torch.testing.assert_close(outputs[0]["loss_bs"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.distributed
def test_pipeline_parallel_2_matches_transformers():
    run_distributed_test(_pipeline_parallel_matches_transformers, 2)


def test_mask_on_causal_layers_is_refused(megatron_tp1):
    config = tiny_model_config(-1)  # packed_sequences=False: causal layers would ignore the mask
    model = _model(config).eval()
    ids, labels, pixels = _sample(config, 20, 1, 5)
    mask = torch.ones(20, 20, dtype=torch.bool).triu(1)[None, None]
    with pytest.raises(ValueError, match="model.packed_sequences=true"):
        model(ids[None], torch.arange(20)[None], pixels, attention_mask=mask, labels=labels[None])
