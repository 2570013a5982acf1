"""Process-group and model-parallel setup from torchrun's environment (nccl on GPU, gloo on CPU)."""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megasail.runtime import cpu_backend

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port that is free on this host right now (for single-process or test rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed from RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun), or as a
    single process when they are absent. Installs the CPU backend when CUDA is not available."""
    if not torch.cuda.is_available():
        cpu_backend.install()
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        launched = max(int(os.environ.get(k, "1")) for k in ("SLURM_NTASKS", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"))
        if launched > 1:  # e.g. srun without torchrun: each process would silently train alone
            raise RuntimeError(f"{launched} processes were launched but RANK is not set: start them with torchrun "
                               "(or export RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT per process)")
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    init_method = None
    if "MASTER_PORT" not in os.environ:
        if world_size > 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: launch with torchrun")
        # a port of its own, passed directly: no MASTER_PORT is left in the environment for a later
        # child process to inherit (and find taken)
        init_method = f"tcp://127.0.0.1:{free_port()}"
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(local_rank)
    else:
        backend = "gloo"
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    log.info("process group: backend=%s rank=%d world_size=%d", backend, rank, world_size)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, then megatron-core's model-parallel RNG tracker.

    The tracker gives tensor-parallel ranks distinct streams (for dropout inside TP regions) and
    data-parallel replicas the same ones, as megatron expects; pipeline stages are offset by
    100 * stage as in Megatron-LM, so layers initialised on different stages are independent.
    """
    if parallel_state.model_parallel_is_initialized():
        seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()  # stages draw distinct streams
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> None:
    """Process group + megatron parallel_state + seeds, in the order megatron-core requires."""
    init_process_group(timeout_minutes)
    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world % model_parallel != 0:
        raise ValueError(
            f"world size {world} is not divisible by tensor ({tensor_model_parallel_size}) x pipeline "
            f"({pipeline_model_parallel_size}) x context ({context_parallel_size}) parallel = {model_parallel}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)


def destroy() -> None:
    """Tear down parallel_state and the process group (tests and clean exits)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
