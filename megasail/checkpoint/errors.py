"""Errors of checkpoint loading; each message says which checkpoint, why, and what to do."""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint that cannot be used as asked; the message says which, why, and what to do."""


class CheckpointMismatchError(CheckpointError, KeyError):
    """The checkpoint's keys or shapes differ from the model's (the message lists them, one per line)."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would print the repr, newlines escaped


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is shorter than its metadata says (a copy or a write cut short)."""
