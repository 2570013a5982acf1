"""The loader's resumable position: a few integers, global over data-parallel ranks.

The data order is a pure function of the config, so the position alone restores the loader in
O(1) (no replay), at any data-parallel size (docs/loader.md, "Resume").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megasail.data.loader.config import DataConfig

STATE_VERSION = 2  # 2: chunk_tokens; epoch-clean segments, shuffled rows, exact stage budgets


@dataclass(frozen=True)
class LoaderPosition:
    """Where the next global batch starts.

    stage: index into DataConfig.stages. chunk, pack: the next packed sequence of the stage
    (chunk of `pack_chunk_samples` blended samples, pack within it in training order).
    chunk_tokens: the stage's sample tokens in chunks before `chunk` (where a token budget cuts
    the stage's last chunk depends on it). stage_*: what the stage has trained so far.
    global_batches: over the whole run. finished: the last stage's budget is spent.
    """

    stage: int = 0
    chunk: int = 0
    pack: int = 0
    chunk_tokens: int = 0
    stage_batches: int = 0
    stage_tokens: int = 0
    stage_samples: int = 0
    global_batches: int = 0
    finished: bool = False


def config_fingerprint(config: DataConfig) -> dict:
    """What decides the order of sequences; a restored state must have been saved under the same.

    Tiling (max_tiles, min_tiles, tile_size) sets every image's tile count and so each sample's
    token count, which decides the packing; a stage's budget decides where its last chunk is cut.
    Settings under which a saved position still points at the same place (pad_token_id,
    micro_batch_size, DP balancing, decoding) are left out, so they may change across a restore.
    """
    return {
        "seed": config.seed,
        "seq_length": config.seq_length,
        "global_batch_size": config.global_batch_size,
        "max_tiles": config.max_tiles,
        "min_tiles": config.min_tiles,
        "tile_size": config.tile_size,
        "pack_window": config.pack_window,
        "pack_chunk_samples": config.pack_chunk_samples,
        "stages": [
            {"name": s.name, "sources": [[src.prefix, float(src.weight)] for src in s.sources],
             "budget_tokens": s.budget_tokens, "budget_samples": s.budget_samples}
            for s in config.stages
        ],
    }


def position_state(position: LoaderPosition, config: DataConfig) -> dict:
    """The state dict saved in checkpoints (plain ints, strings and lists)."""
    return {"version": STATE_VERSION, "position": dataclasses.asdict(position),
            "config": config_fingerprint(config)}


def position_from_state(state: dict, config: DataConfig) -> LoaderPosition:
    """Position of a saved state; refuses a state saved under a different data order."""
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
    saved, current = state["config"], config_fingerprint(config)
    changed = sorted(k for k in current if saved.get(k) != current[k])
    if changed:
        raise ValueError(
            f"loader state was saved with different data settings ({', '.join(changed)}): "
            f"saved {[saved.get(k) for k in changed]}, now {[current[k] for k in changed]}; "
            "the saved position would point at other samples"
        )
    return LoaderPosition(**state["position"])
