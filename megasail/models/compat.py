"""The megatron-core internals the models package relies on, each behind a function that checks them.

Written against torch 2.13.0 and megatron-core 0.16.1 (``megasail.versions.WRITTEN_FOR``); a missing
attribute raises ``PrivateAPIError`` naming it, the version written for, the one installed and what to do.

- ``is_elementwise_normal``: megatron's ``init_method_normal`` / ``scaled_init_method_normal`` return
  ``functools.partial(torch.nn.init.normal_, ...)``; init.py draws such weights slice by slice.
"""

from __future__ import annotations

import functools

import torch

from megasail.versions import private_api_error, private_attr

USER = "megasail.models"
_PIN = "install megatron-core 0.16.1 (constraints-cpu.txt) or update megasail/models/compat.py"


def _require(obj, name: str, thing: str, what_to_do: str = _PIN):
    return private_attr(obj, name, user=USER, library="megatron-core", thing=thing, what_to_do=what_to_do)


@functools.cache
def _megatron_normal_is_partial() -> bool:
    from megatron.core import utils

    made = _require(utils, "init_method_normal", "utils.init_method_normal")(1.0)
    return isinstance(made, functools.partial) and made.func is torch.nn.init.normal_


def is_elementwise_normal(init_fn) -> bool:
    """Whether ``init_fn`` is megatron's i.i.d. normal init (so any slice of a tensor can be drawn alone).

    Raises PrivateAPIError when megatron-core's ``init_method_normal`` no longer returns a
    ``functools.partial`` of ``torch.nn.init.normal_``: the check could not tell its inits apart then,
    and tensor-parallel weights would silently be drawn whole, giving other initial weights."""
    if not _megatron_normal_is_partial():
        raise private_api_error(
            USER,
            "megatron-core",
            "init_method_normal returning functools.partial(torch.nn.init.normal_, ...)",
            "install megatron-core 0.16.1 (constraints-cpu.txt) or teach is_elementwise_normal in "
            "megasail/models/compat.py the new form",
        )
    return isinstance(init_fn, functools.partial) and init_fn.func is torch.nn.init.normal_
