"""Run megatron-core on CPU processes (gloo) by answering the CUDA calls it makes.

megatron-core assumes CUDA throughout (``device=torch.cuda.current_device()``, CUDA RNG trackers,
``param.grad.type() == 'torch.cuda.FloatTensor'`` checks, streams in DDP). This module maps each
of those onto the CPU so the production code path (the same layers, schedules, DDP and optimizer)
runs in CI. It is installed only when CUDA is absent; on a GPU machine nothing here is touched.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_installed = False
_mode: TorchFunctionMode | None = None


def _is_cuda_device(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # megatron passes torch.cuda.current_device() (an int) as a device
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaDeviceToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` / ``device=<int>`` in tensor factories and ``.to()`` to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is synchronous, so every wait is already satisfied."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoOpStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0


def _cpu_get_rng_state(*args, **kwargs):
    return torch.default_generator.get_state()


def _cpu_set_rng_state(new_state, *args, **kwargs):
    torch.default_generator.set_state(new_state)


def _cpu_manual_seed(seed, *args, **kwargs):
    # torch.manual_seed would call back into torch.cuda.manual_seed_all: seed the generator directly
    torch.default_generator.manual_seed(int(seed))


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def install() -> bool:
    """Install the CPU backend if CUDA is absent. Returns True when it is (now or already) active."""
    global _installed, _mode
    if _installed:
        return True
    if torch.cuda.is_available():
        return False

    cuda = torch.cuda
    # Reads of .grad that megatron makes (None-checked) reach torch through the mode below, which then warns
    # once per rank that the tensor is not a leaf: nothing is wrong, so the warning is not shown.
    warnings.filterwarnings(
        "ignore", message=r"The \.grad attribute of a Tensor that is not a leaf Tensor", category=UserWarning
    )
    # Device management: a CPU process has one "device", index 0.
    cuda.current_device = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    # Streams and events (DDP overlap, optimizer): CPU execution is already ordered.
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.current_stream = lambda *a, **k: _NoOpStream()
    cuda.default_stream = lambda *a, **k: _NoOpStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # NVTX ranges are profiler annotations; the CPU build has no NVTX library.
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()
    # RNG: megatron's tracker forks "the CUDA generator"; on CPU that is the default generator.
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    cuda.manual_seed = _cpu_manual_seed
    cuda.manual_seed_all = _cpu_manual_seed
    cuda.random.get_rng_state = _cpu_get_rng_state
    cuda.random.set_rng_state = _cpu_set_rng_state

    from megatron.core.tensor_parallel import random as mcore_random

    # megatron keeps its own copies of the CUDA RNG getters/setters; point them at the CPU generator.
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state

    # Tensor.cuda() is a no-op; Tensor.type() (no args) reports the CUDA type name, because
    # megatron's grad clipping and distributed optimizer assert on 'torch.cuda.FloatTensor'.
    torch.Tensor.cuda = lambda self, *a, **k: self
    _orig_type = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            name = _CUDA_TYPE_NAMES.get(self.dtype)
            if name is not None:
                return name
        if dtype is None:
            return _orig_type(self)
        return _orig_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type

    # A mode is off while its own handler runs, and torch.autograd.backward/grad dispatch through
    # it: re-enter the mode around the autograd engine, where megatron's backward allocates on "cuda".
    _orig_engine = torch.autograd._engine_run_backward

    def _engine_run_backward(*args, **kwargs):
        with _CudaDeviceToCpu():
            return _orig_engine(*args, **kwargs)

    torch.autograd._engine_run_backward = _engine_run_backward

    _mode = _CudaDeviceToCpu()
    _mode.__enter__()  # stays active for the life of the process
    _installed = True
    log.info("CUDA not available: megatron-core runs on the CPU backend (gloo)")
    return True
