"""The megatron-core internals the training package relies on, each behind a function that checks them.

Written against torch 2.13.0 and megatron-core 0.16.1 (``megasail.versions.WRITTEN_FOR``); a missing
attribute raises ``PrivateAPIError`` naming it, the version written for, the one installed and what to do.

- ``release_ddp_hooks``: a stage switch empties the old DistributedDataParallel's ``param_to_bucket_group``
  and ``grad_accs`` so its backward hooks go inert and die (stages.py says why).
- ``recompute_core_attention``: selective recomputation sets ``Attention.checkpoint_core_attention``,
  which megatron fixes at build time.
(``is_elementwise_normal``, which models/init.py needs, lives in megasail/models/compat.py.)
"""

from __future__ import annotations

from megasail.versions import private_attr

USER = "megasail.training"
_PIN = "install megatron-core 0.16.1 (constraints-cpu.txt) or update megasail/training/compat.py"


def _require(obj, name: str, thing: str, what_to_do: str = _PIN):
    return private_attr(obj, name, user=USER, library="megatron-core", thing=thing, what_to_do=what_to_do)


def release_ddp_hooks(wrapped) -> None:
    """Make a megatron DistributedDataParallel's gradient hooks inert and let go of the autograd
    accumulator nodes they hang on (the hooks, which hold the DDP, die with them)."""
    _require(
        wrapped,
        "param_to_bucket_group",
        "DistributedDataParallel.param_to_bucket_group",
        "a stage switch could not release the previous stage's gradient hooks; " + _PIN,
    )
    _require(
        wrapped,
        "grad_accs",
        "DistributedDataParallel.grad_accs",
        "a stage switch could not release the previous stage's gradient hooks; " + _PIN,
    )
    wrapped.param_to_bucket_group = {}  # its backward hooks do nothing for a parameter not in here
    wrapped.grad_accs = []  # the accumulator nodes die with their last reference, and the hooks with them


def recompute_core_attention(attention) -> None:
    """Turn on recomputation of core attention in a built megatron ``Attention`` module."""
    _require(
        attention,
        "checkpoint_core_attention",
        "Attention.checkpoint_core_attention",
        "train.recompute=selective would silently recompute nothing; " + _PIN,
    )
    attention.checkpoint_core_attention = True
