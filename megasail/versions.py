"""The library versions megasail's uses of private torch and megatron-core APIs were written against,
and the one check they all go through.

Each package that touches a private attribute (or relies on how a library builds something) does it in
its own compat module: ``megasail/checkpoint/compat.py``, ``megasail/training/compat.py``,
``megasail/models/compat.py``, ``megasail/data/compat.py`` and ``megasail/runtime/cpu_backend.py``. Those
reach the attribute through ``private_attr`` here, which returns it or raises ``PrivateAPIError`` with
one line naming the megasail package, the attribute, the version it was written for, the version
installed and what to do.
"""

from __future__ import annotations

from importlib import metadata

# the versions every compat module was written and tested against
WRITTEN_FOR = {"torch": "2.13.0", "megatron-core": "0.16.1"}

_NOT_FOUND = object()


class PrivateAPIError(RuntimeError):
    """An installed torch or megatron-core lacks a private API megasail relies on (one-line message)."""


def installed_version(library: str) -> str:
    """The installed distribution's version ("2.13.0+cpu"), or "not installed"."""
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "not installed"


def private_api_error(user: str, library: str, thing: str, what_to_do: str) -> PrivateAPIError:
    """The error for ``user`` (a megasail package) missing ``library``'s ``thing``: "megasail.X needs
    megatron-core's <thing> (written for megatron-core 0.16.1, found <version>): <what_to_do>"."""
    return PrivateAPIError(
        f"{user} needs {library}'s {thing} (written for {library} {WRITTEN_FOR[library]}, "
        f"found {installed_version(library)}): {what_to_do}"
    )


def private_attr(obj, name: str, *, user: str, library: str, thing: str, what_to_do: str):
    """``getattr(obj, name)``, or PrivateAPIError (see ``private_api_error``) when ``obj`` has no ``name``."""
    value = getattr(obj, name, _NOT_FOUND)
    if value is _NOT_FOUND:
        raise private_api_error(user, library, thing, what_to_do)
    return value
