"""The private torch APIs the data package relies on, each behind a function that checks them.

Written against torch 2.13.0 (``megasail.versions.WRITTEN_FOR``); a missing attribute raises
``PrivateAPIError`` naming it, the version written for, the one installed and what to do.

- ``cuda_is_in_bad_fork``: ``torch.cuda._is_in_bad_fork``, whether this process was forked from one
  that had initialised CUDA (a loader worker must not decode on the GPU then).
- ``new_shared_storage``: ``torch.UntypedStorage._new_shared``, the shared-memory storage torch's own
  ``default_collate`` allocates in DataLoader workers (sent to the main process without a copy).
"""

from __future__ import annotations

import torch

from megasail.versions import private_attr

USER = "megasail.data"
_PIN = "install torch 2.13 (constraints-cpu.txt) or update megasail/data/compat.py"


def cuda_is_in_bad_fork() -> bool:
    """Whether this process is a fork of one that had initialised CUDA."""
    return private_attr(
        torch.cuda,
        "_is_in_bad_fork",
        user=USER,
        library="torch",
        thing="torch.cuda._is_in_bad_fork",
        what_to_do=_PIN,
    )()


def new_shared_storage(nbytes: int) -> torch.UntypedStorage:
    """An uninitialised CPU storage of ``nbytes`` in shared memory."""
    return private_attr(
        torch.UntypedStorage,
        "_new_shared",
        user=USER,
        library="torch",
        thing="torch.UntypedStorage._new_shared",
        what_to_do="loader workers could not hand batches over in shared memory; " + _PIN,
    )(nbytes)
