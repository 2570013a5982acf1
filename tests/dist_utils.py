"""run_distributed_test: run a plain function on N local processes (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
import tempfile
import traceback

import torch.multiprocessing as mp

from megasail.runtime import free_port


def _worker(rank: int, world_size: int, port: int, error_dir: str, fn, args) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        # a file, not a queue: a long traceback would block on a full pipe nobody reads yet
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc()[-20000:])
        raise
    finally:
        from megasail.runtime import destroy

        destroy()


def run_distributed_test(fn, world_size: int, *args) -> None:
    """Spawn world_size processes running fn(rank, world_size, *args); re-raise the first failure.

    fn must be a module-level function (it is pickled into spawned processes).
    """
    with tempfile.TemporaryDirectory() as error_dir:
        try:
            mp.start_processes(_worker, args=(world_size, free_port(), error_dir, fn, args),
                               nprocs=world_size, join=True, start_method="spawn")
        except mp.ProcessRaisedException as e:
            msgs = []
            for name in sorted(os.listdir(error_dir)):
                with open(os.path.join(error_dir, name)) as f:
                    msgs.append(f"--- {name} ---\n{f.read()}")
            raise AssertionError("distributed test failed:\n" + "\n".join(msgs or [str(e)])) from None
