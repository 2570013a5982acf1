"""Read wandb's offline run files back (the transaction log wandb writes as run-<id>.wandb).

wandb keeps no Python reader of its own any more; the file is a LevelDB-style log: a 7-byte header
(':W&B', magic, version), then records of [crc32 (4), length (2), type (1)] in 32 KiB blocks, each a
serialized wandb_internal_pb2.Record (FULL = 1, or FIRST / MIDDLE / LAST pieces).
"""

from __future__ import annotations

import glob
import json
import os
import struct

BLOCK = 32768


def _payloads(data: bytes):
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        space = BLOCK - pos % BLOCK
        if space < 7:  # a block's tail too short for a record header is padding
            pos += space
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def offline_runs(directory: str) -> list[dict]:
    """Every offline run under DIRECTORY/wandb, oldest first: {"id", "config", "history": {step: {key: value}}}."""
    from wandb.proto import wandb_internal_pb2 as pb

    runs = []
    for path in sorted(glob.glob(os.path.join(directory, "wandb", "offline-run-*", "run-*.wandb"))):
        with open(path, "rb") as f:
            data = f.read()
        assert data[:4] == b":W&B", path
        run = {"id": None, "config": {}, "history": {}}
        for payload in _payloads(data):
            record = pb.Record()
            record.ParseFromString(payload)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["id"] = record.run.run_id
                for item in record.run.config.update:
                    run["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                run["history"][int(row["_step"])] = row
        runs.append(run)
    return runs
