"""`doc()`: a dataclass field that carries its one-line documentation (read by --help and tests)."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


def doc(help_text: str, default: Any = dataclasses.MISSING, **kwargs):
    """``x: int = doc("what x is", 3)``; list/dict defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help_text}, **kwargs)
    return field(default=default, metadata={"help": help_text}, **kwargs)
