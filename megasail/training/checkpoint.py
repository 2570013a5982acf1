"""The checkpoint code lives in ``megasail.checkpoint``; this module re-exports it for scripts that still
import it from here. New code imports ``megasail.checkpoint``."""

from megasail.checkpoint import *  # noqa: F403
from megasail.checkpoint import __all__  # noqa: F401
