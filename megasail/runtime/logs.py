"""Console logging for the entry points: megasail's own messages at INFO, megatron-core's chatter hidden.

megatron-core logs its DDP and optimizer configs, every gradient bucket's parameters and FSDP notices at
INFO on every rank (about 70 lines a run); they help when debugging a layout, not in a run's console.
``MEGASAIL_LOG_LEVEL=DEBUG`` shows all of it (and megasail's debug messages).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LEVEL_ENV = "MEGASAIL_LOG_LEVEL"
_QUIET = ("megatron",)  # megatron.core.*: shown at WARNING and above unless debugging


def setup_logging(stream=sys.stderr) -> int:
    """Configure the root logger from $MEGASAIL_LOG_LEVEL (default INFO); returns the level."""
    name = os.environ.get(LEVEL_ENV, "INFO").upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise SystemExit(f"{LEVEL_ENV}={name!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)")
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", stream=stream)
    if level > logging.DEBUG:
        for logger in _QUIET:
            logging.getLogger(logger).setLevel(logging.WARNING)
        # dist_checkpointing's torch strategy calls DCP's deprecated load_state_dict on every load
        warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated", category=FutureWarning)
    return level
