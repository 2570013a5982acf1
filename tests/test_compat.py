"""Each compat module fails with one clear line when the installed torch / megatron-core lacks a private
API it relies on: the megasail package, the attribute, the version written for, the one found, what to do.

The attributes are taken away with monkeypatch (a stand-in object where megatron sets them per instance);
the behaviour they enable is tested where it is used (test_checkpoint, test_train_stages, ...).
"""

from __future__ import annotations

import re
import types

import pytest
import torch

from megasail.versions import PrivateAPIError, installed_version


def _message(user: str, library: str, thing: str) -> re.Pattern:
    written = {"torch": "2.13.0", "megatron-core": "0.16.1"}[library]
    found = installed_version(library)
    return re.compile(
        rf"^{re.escape(user)} needs {re.escape(library)}'s {re.escape(thing)} "
        rf"\(written for {re.escape(library)} {re.escape(written)}, found {re.escape(found)}\): \S.+$"
    )


def _raises(pattern: re.Pattern, call) -> str:
    with pytest.raises(PrivateAPIError) as info:
        call()
    message = str(info.value)
    assert pattern.match(message), message
    assert "\n" not in message
    return message


# --- megasail/checkpoint/compat.py -----------------------------------------------------------------


def test_checkpoint_writer_queue_needs_megatrons_results_queue(monkeypatch):
    """Fault caught: the check removed (``getattr(filesystem_async, "_results_queue", None)``): the save
    goes on silently and megatron's own Manager outlives a killed trainer again."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megasail.checkpoint import compat

    monkeypatch.delattr(filesystem_async, "_results_queue")
    monkeypatch.setattr(compat, "_writer_manager", None)
    thing = "dist_checkpointing.strategies.filesystem_async._results_queue"
    message = _raises(
        _message("megasail.checkpoint", "megatron-core", thing), compat.seed_writer_results_queue
    )
    assert "outlives a killed trainer" in message
    assert compat._writer_manager is None  # nothing was started


def test_checkpoint_adam_load_fix_needs_the_distributed_optimizers_setter(monkeypatch):
    """Fault caught: the check removed: the patch would wrap a method that is not there (AttributeError
    deep inside a load, naming no version)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megasail.checkpoint.compat import torch_adam_load_fixes

    optimizer = DistributedOptimizer.__new__(DistributedOptimizer)  # a stand-in: no model needed
    optimizer.optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    optimizer.model_param_group_index_map = {}
    monkeypatch.delattr(DistributedOptimizer, "_set_main_param_and_optimizer_states")

    def enter():
        with torch_adam_load_fixes(optimizer):
            pass

    thing = "DistributedOptimizer._set_main_param_and_optimizer_states"
    _raises(_message("megasail.checkpoint", "megatron-core", thing), enter)


def test_checkpoint_streaming_writer_needs_megatrons_key_replacement(monkeypatch):
    """Fault caught: the check removed (a plain attribute read): AttributeError naming no version."""
    from megatron.core.dist_checkpointing.strategies import torch as torch_dist

    from megasail.checkpoint.compat import torch_dist_strategy_parts

    monkeypatch.delattr(torch_dist, "_replace_state_dict_keys_with_sharded_keys")
    thing = "dist_checkpointing.strategies.torch._replace_state_dict_keys_with_sharded_keys"
    _raises(_message("megasail.checkpoint", "megatron-core", thing), torch_dist_strategy_parts)


# --- megasail/training/compat.py -------------------------------------------------------------------


def test_training_stage_switch_needs_ddp_hook_attributes():
    """A DDP without ``param_to_bucket_group`` (megatron sets it per instance): a clear error, not a
    silently added attribute that leaves the old stage's hooks alive.

    Fault caught: the check removed: the stand-in gets the attributes set and no error is raised."""
    from megasail.training.compat import release_ddp_hooks

    newer_ddp = types.SimpleNamespace(grad_accs=[object()])
    thing = "DistributedDataParallel.param_to_bucket_group"
    _raises(_message("megasail.training", "megatron-core", thing), lambda: release_ddp_hooks(newer_ddp))
    assert not hasattr(newer_ddp, "param_to_bucket_group") and len(newer_ddp.grad_accs) == 1  # untouched


def test_training_selective_recompute_needs_attentions_flag():
    """Fault caught: the check removed: the flag is set on a module that never reads it (recomputes
    nothing)."""
    from megasail.training.compat import recompute_core_attention

    newer_attention = types.SimpleNamespace()
    thing = "Attention.checkpoint_core_attention"
    message = _raises(
        _message("megasail.training", "megatron-core", thing),
        lambda: recompute_core_attention(newer_attention),
    )
    assert "recompute nothing" in message and not hasattr(newer_attention, "checkpoint_core_attention")


def test_training_init_needs_megatrons_normal_init_to_be_a_partial(monkeypatch):
    """megatron's init_method_normal returning something other than functools.partial(normal_): a clear
    error, not weights silently drawn whole (other initial weights than the same seed gave before).

    Fault caught: is_elementwise_normal without the check (returns False, no error)."""
    from megatron.core import utils

    from megasail.models import compat

    def closure_init(sigma):
        return lambda tensor: torch.nn.init.normal_(tensor, 0.0, sigma)

    compat._megatron_normal_is_partial.cache_clear()
    monkeypatch.setattr(utils, "init_method_normal", closure_init)
    try:
        thing = "init_method_normal returning functools.partial(torch.nn.init.normal_, ...)"
        _raises(
            _message("megasail.models", "megatron-core", thing),
            lambda: compat.is_elementwise_normal(closure_init(0.02)),
        )
        monkeypatch.delattr(utils, "init_method_normal")
        compat._megatron_normal_is_partial.cache_clear()
        _raises(
            _message("megasail.models", "megatron-core", "utils.init_method_normal"),
            lambda: compat.is_elementwise_normal(closure_init(0.02)),
        )
    finally:
        compat._megatron_normal_is_partial.cache_clear()


def test_training_init_tells_megatrons_normal_init_apart():
    """The installed megatron's normal inits are elementwise, its xavier-style and torch's others are not.

    Fault caught: comparing with torch.nn.init.normal (no underscore): every init reads as not elementwise."""
    from megatron.core.utils import init_method_normal, scaled_init_method_normal

    from megasail.models.compat import is_elementwise_normal

    assert is_elementwise_normal(init_method_normal(0.02))
    assert is_elementwise_normal(scaled_init_method_normal(0.02, 4))
    assert not is_elementwise_normal(torch.nn.init.xavier_uniform_)
    assert not is_elementwise_normal(lambda t: torch.nn.init.normal_(t, 0.0, 0.02))


# --- megasail/data/compat.py -----------------------------------------------------------------------


def test_data_gpu_decode_needs_torchs_bad_fork_check(monkeypatch):
    """The loader's worker init reaches torch.cuda._is_in_bad_fork through the compat module.

    Fault caught: decode.py calling torch.cuda._is_in_bad_fork directly again (AttributeError, no version)."""
    from megasail.data.images import decode

    monkeypatch.delattr(torch.cuda, "_is_in_bad_fork")
    _raises(
        _message("megasail.data", "torch", "torch.cuda._is_in_bad_fork"),
        lambda: decode.enable_gpu_decode_in_worker(0),
    )


def test_data_shared_tensors_need_torchs_shared_storage(monkeypatch):
    """Fault caught: worker.py calling torch.UntypedStorage._new_shared directly again."""
    from megasail.data.loader.worker import shared_float32

    assert shared_float32((2, 3)).is_shared()  # what it is for, with the attribute there
    monkeypatch.setattr(torch, "UntypedStorage", types.SimpleNamespace())  # (inherited from a C base type)
    _raises(
        _message("megasail.data", "torch", "torch.UntypedStorage._new_shared"), lambda: shared_float32((2, 3))
    )


# --- megasail/runtime/cpu_backend.py ---------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend installs only without CUDA")
@pytest.mark.parametrize(
    "owner, name, library, thing",
    [
        ("autograd", "_engine_run_backward", "torch", "torch.autograd._engine_run_backward"),
        (
            "mcore_random",
            "_get_cuda_rng_state",
            "megatron-core",
            "tensor_parallel.random._get_cuda_rng_state",
        ),
    ],
)
def test_runtime_cpu_backend_checks_before_patching(monkeypatch, owner, name, library, thing):
    """A missing private name stops install() before anything is patched (torch.cuda keeps its own
    functions), with the one-line error.

    Fault caught: the megatron RNG names assigned without the check (install succeeds, megatron's
    tracker would keep reading the real CUDA RNG)."""
    from megatron.core.tensor_parallel import random as mcore_random

    from megasail.runtime import cpu_backend

    monkeypatch.setattr(cpu_backend, "_installed", False)
    monkeypatch.delattr({"autograd": torch.autograd, "mcore_random": mcore_random}[owner], name)
    current_device = torch.cuda.current_device
    _raises(_message("megasail.runtime", library, thing), cpu_backend.install)
    assert torch.cuda.current_device is current_device and cpu_backend._installed is False
