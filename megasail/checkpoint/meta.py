"""megasail.json: the run state beside the tensors of a step dir (docs/checkpoints.md lists its keys).

The checkpoint package writes ``iteration``, ``format_version``, ``layout``, ``weights_only``,
``optimizer_sharding`` and ``saved_at``; the caller's run state (``stage``, ``stage_iteration``,
``stage_start_step``, ``loader_state``, ``config``, ``consumed``, ``skipped``, ``wandb_run_id``, a
converter's ``converted_from`` ...) sits beside them at the top level of the same JSON object.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from megasail.checkpoint.layout import META, require_checkpoint

FORMAT_VERSION = 1
OWN_KEYS = ("iteration", "format_version", "layout", "weights_only", "optimizer_sharding", "saved_at")


def utc_now() -> str:
    """The current UTC time as megasail.json's ``saved_at`` writes it: 2025-01-31T12:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class CheckpointMeta:
    """One step dir's megasail.json.

    iteration: optimizer steps done; layout: {"tp", "pp", "vpp", "dp"} it was saved at (None when a
    hand-written file lacks it); weights_only: only "model" is stored; optimizer_sharding:
    "dp_reshardable" or "fully_reshardable", None when weights only; saved_at: utc_now() at the save;
    run: the caller's run state, JSON-serialisable, written at the top level beside the fields above
    (which win).
    """

    iteration: int
    layout: dict | None
    weights_only: bool
    optimizer_sharding: str | None = None
    saved_at: str | None = None
    format_version: int = FORMAT_VERSION
    run: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The JSON object written to megasail.json: ``run``'s keys plus the checkpoint's own."""
        own = {
            "iteration": int(self.iteration),
            "format_version": self.format_version,
            "layout": self.layout,
            "weights_only": bool(self.weights_only),
            "optimizer_sharding": self.optimizer_sharding,
            "saved_at": self.saved_at,
        }
        return {**self.run, **own}

    def dumps(self, where: str) -> str:
        """``to_json()`` as megasail.json's text (sorted keys); TypeError naming ``where`` if the run
        state is not JSON-serialisable."""
        try:
            return json.dumps(self.to_json(), indent=1, sort_keys=True)
        except TypeError as e:
            raise TypeError(f"checkpoint meta for {where} is not JSON-serialisable: {e}") from None

    @classmethod
    def from_json(cls, data: dict, source: str) -> CheckpointMeta:
        """Parse a megasail.json object read from ``source`` (named in errors). ValueError when it is
        not an object with an integer iteration, or its format_version is newer than this code's."""
        if not isinstance(data, dict) or not isinstance(data.get("iteration"), int):
            raise ValueError(f"{source}: not a megasail.json object with an integer 'iteration'")
        version = data.get("format_version", 0)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{source}: format_version {version} is newer than this code's {FORMAT_VERSION} "
                "(update megasail to read it)"
            )
        return cls(
            iteration=data["iteration"],
            layout=data.get("layout"),
            weights_only=bool(data.get("weights_only", False)),
            optimizer_sharding=data.get("optimizer_sharding"),
            saved_at=data.get("saved_at"),
            format_version=version,
            run={k: v for k, v in data.items() if k not in OWN_KEYS},
        )

    @classmethod
    def read(cls, path: str) -> CheckpointMeta:
        """The meta of a step dir, or of the latest checkpoint under a checkpoint root."""
        return cls.from_json(*_read_json(path))

    @property
    def config(self) -> str | None:
        """The run's resolved RunConfig as YAML (None in a checkpoint written without one)."""
        return self.run.get("config")

    @property
    def stage_index(self) -> int | None:
        """The curriculum stage it was saved in (None when not recorded)."""
        return (self.run.get("stage") or {}).get("index")


def read_meta(path: str) -> dict:
    """megasail.json of a step dir, or of the latest checkpoint under a checkpoint root, as stored (a dict
    with every key). FileNotFoundError without a checkpoint; ValueError for a newer format_version."""
    data, source = _read_json(path)
    CheckpointMeta.from_json(data, source)  # the format check: a newer one is refused by every reader
    return data


def _read_json(path: str) -> tuple[dict, str]:
    source = os.path.join(require_checkpoint(path), META)
    with open(source) as f:
        return json.load(f), source
