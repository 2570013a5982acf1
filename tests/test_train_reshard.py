"""A checkpoint written by pretrain() at one layout continues at another: saved at TP=2 it resumes at
TP=1 with the losses an uninterrupted TP=2 run logs, and saved at DP=2 it resumes at DP=1 on the
samples the uninterrupted run would have used (the same sample tokens each step), with the optimizer
state written by every DP rank in parallel (dp_reshardable)."""

from __future__ import annotations

import json

import pytest
from dist_utils import run_distributed_test
from train_utils import make_datasets, tiny_run_config, two_stages

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, SPLIT = 4, 2


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    # 300 + 5 tokens: megatron's padding to 128 x TP would give 384 at TP=1 and 512 at TP=2
    return make_datasets(str(tmp_path_factory.mktemp("reshard_data")), vocab_size=300)


def _run(prefixes, root: str, name: str, overrides: list[str]) -> None:
    """One pretrain() (a single stage over 'b' that trains everything); rank 0 writes its per-step
    losses and sample tokens to root/name.json."""
    import torch.distributed as dist

    from megasail.training.loop import pretrain

    cfg = tiny_run_config(["seed=5", f"logging.dir={root}/{name}", *overrides])
    stage = two_stages(prefixes)[1]
    stage.trainable = ["vision", "projector", "language"]
    cfg.data.stages = [stage]
    losses = pretrain(cfg)["losses"]
    if dist.get_rank() == 0:
        with open(f"{root}/{name}/metrics.jsonl") as f:
            tokens = [json.loads(line)["tokens"] for line in f]
        with open(f"{root}/{name}.json", "w") as f:
            json.dump({"losses": losses, "tokens": tokens}, f)


def _two_process_runs(rank, world_size, prefixes, root, layout):
    _run(prefixes, root, "whole", [*layout, f"train.iters={STEPS}"])
    _run(prefixes, root, "first", [*layout, f"train.iters={SPLIT}", f"checkpoint.save={root}/ckpt"])


def _one_process_resume(rank, world_size, prefixes, root):
    _run(prefixes, root, "second", [f"train.iters={STEPS}", f"checkpoint.load={root}/ckpt"])
    _run(prefixes, root, "whole_tp1", [f"train.iters={STEPS}"])


@pytest.mark.parametrize(
    "layout",
    [["parallel.tensor=2"], ["parallel.tensor=1", "checkpoint.optimizer_sharding=dp_reshardable"]],
    ids=["tp2_to_tp1", "dp2_to_dp1"],
)
def test_checkpoint_continues_at_another_layout(datasets, tmp_path, layout):
    """Steps 1-2 on two processes (TP=2, or DP=2), a save, then steps 3-4 in one process (TP=1, DP=1); and
    the whole run at TP=1 from scratch logs the two-process run's losses. The vocabulary is left unset, as
    tiny.yaml leaves it (taken from the dataset's 305-token tokenizer).

    The TP=2 run saves its optimizer with the default, fully_reshardable (one tensor per parameter,
    gathered); the DP=2 run dp_reshardable, the at-scale layout (each DP rank writes its own shard).

    Fails if the model or optimizer state is not resharded on load (the TP=1 loss differs), if the
    data position restores at another point at DP=1 (the sample tokens of steps 3-4 differ; planted:
    the loader state dropped on load), or if the padded vocabulary depends on TP (padded to 128 x TP:
    the TP=2 checkpoint holds 512 rows and does not load into TP=1's 384; a fresh TP=1 run trains
    another model than TP=2)."""
    root = str(tmp_path)
    run_distributed_test(_two_process_runs, 2, datasets, root, layout)
    run_distributed_test(_one_process_resume, 1, datasets, root)
    whole, first, second, whole_tp1 = (
        json.loads((tmp_path / f"{n}.json").read_text()) for n in ("whole", "first", "second", "whole_tp1")
    )
    assert whole_tp1["tokens"] == whole["tokens"]
    assert whole_tp1["losses"] == pytest.approx(whole["losses"], rel=1e-4)
    assert first["losses"] == whole["losses"][:SPLIT]
    assert len(second["losses"]) == STEPS - SPLIT
    assert second["tokens"] == whole["tokens"][SPLIT:]
    assert second["losses"] == pytest.approx(whole["losses"][SPLIT:], rel=1e-4)
