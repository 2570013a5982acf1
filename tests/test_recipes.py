"""examples/pretrain_655b.sh and examples/sft_curriculum.sh, and the plan they print (megasail.plan).

The expected numbers are computed here from the recipe's settings (512 x 8192 token slots per step,
packing efficiency 0.99, the stage budgets of the SAIL-VL paper), not by the plan module."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, timeout=300, env_extra=None):
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "RANK",
            "LOCAL_RANK",
            "WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
            "SLURM_JOB_ID",
            "SLURM_JOB_NUM_NODES",
        )
    }
    env.update(PYTHONPATH=REPO, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _stage_rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| pretrain_") or line.startswith("| sft_") or line.startswith("| total"):
            rows[cells[0]] = cells
    return rows


def _num(text: str) -> float:
    return float(text.replace(",", "").split()[0])


@pytest.mark.parametrize("model,nodes,tp,tps", [("2b", 16, 1, 20000), ("8b", 32, 4, 7000)])
def test_pretrain_dry_run_plan_arithmetic(model, nodes, tp, tps):
    """Fails if the plan's GPU count, data-parallel size, micro-batches, tokens per step, iterations
    (ceil of budget over packed sample tokens) or days at the stated sample tokens/s are computed
    wrongly, e.g. the packing efficiency left out, iterations rounded down, or days from another GPU count."""
    proc = _run(
        [
            "bash",
            "examples/pretrain_655b.sh",
            "--dry-run",
            "--model",
            model,
            "--nodes",
            str(nodes),
            "--tokens-per-s-per-gpu",
            str(tps),
        ]
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    gpus = nodes * 8
    dp = gpus // tp
    slots = 512 * 8192
    assert f"on {gpus} GPUs ({nodes} nodes x 8)" in out
    assert f"TP={tp}, PP=1, CP=1, DP={dp}" in out
    assert f"{slots:,} token slots per step" in out and f"{512 // dp} micro-batches per DP rank" in out
    rows = _stage_rows(out)
    days_total, iters_total = 0.0, 0
    for name, budget in (("pretrain_alignment", 131e9), ("pretrain_advance", 524e9)):
        iters = math.ceil(budget / (slots * 0.99))
        days = iters * slots * 0.99 / (tps * gpus) / 86400  # stated tokens/s are sample tokens
        cells = rows[name]
        assert _num(cells[3]) == iters, cells
        assert _num(cells[7]) == tps * gpus, cells
        assert abs(_num(cells[8]) - days) < 0.006, (cells, days)
        days_total += days
        iters_total += iters
    assert rows["pretrain_alignment"][1] == "projector" and rows["pretrain_advance"][1] == "vision+projector"
    assert _num(rows["total"][3]) == iters_total and abs(_num(rows["total"][8]) - days_total) < 0.011
    assert "pretrain_vlm.py --config" in out and f"srun --nodes {nodes} --ntasks-per-node 8" in out


def test_pretrain_dry_run_defaults_to_each_stage_at_one_mfu():
    """Without a stated tokens/s the script's plan times each stage by its own FLOPs at --mfu of --gpu
    (MFU / GPU in the environment work too).

    Fails if the script still passes one tokens/s figure for every stage, or drops --mfu / --gpu."""
    proc = _run(["bash", "examples/pretrain_655b.sh", "--dry-run", "--model", "2b", "--gpu", "B200"],
                env_extra={"MFU": "0.4"})
    assert proc.returncode == 0, proc.stderr
    rows = _stage_rows(proc.stdout)
    align, advance = rows["pretrain_alignment"], rows["pretrain_advance"]
    assert align[9] == advance[9] == "MFU 40% of B200 (2250 bf16 TFLOP/s)"
    assert _num(advance[6]) / _num(align[6]) == pytest.approx(_num(advance[4]) / _num(align[4]), rel=0.02)
    assert _num(advance[6]) > 1.3 * _num(align[6])  # the ViT's backward in the advance stage


def test_pretrain_script_refuses_bad_arguments():
    """Fails if an unknown model or flag is accepted silently, or a real launch starts outside Slurm."""
    bad = _run(["bash", "examples/pretrain_655b.sh", "--dry-run", "--model", "3b"])
    assert bad.returncode == 2 and "--model must be 2b or 8b, got '3b'" in bad.stderr
    bad = _run(["bash", "examples/pretrain_655b.sh", "--nodse", "2"])
    assert bad.returncode == 2 and "unknown argument '--nodse'" in bad.stderr
    helped = _run(["bash", "examples/pretrain_655b.sh", "--help"])
    assert helped.returncode == 0 and "--dry-run" in helped.stdout and "TOKENS_PER_S_PER_GPU" in helped.stdout


def test_pretrain_script_reads_its_recipe_yaml(tmp_path):
    """The recipe's values come from examples/configs/recipes/pretrain_655b.yaml: a copy with another
    global batch, layout and plan default changes the plan.

    Fault caught: the script ignoring the recipe's `setting` lines (its old values written in bash)."""
    import yaml

    recipe = yaml.safe_load(open(os.path.join(REPO, "examples/configs/recipes/pretrain_655b.yaml")))
    recipe["settings"]["data.global_batch_size"] = 256
    recipe["models"]["8b"]["settings"]["parallel.tensor"] = 2
    recipe["plan"]["nodes"] = 4
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = _run(["bash", "examples/pretrain_655b.sh", "--dry-run", "--model", "8b", "--recipe", str(path)])
    assert proc.returncode == 0, proc.stderr
    assert "on 32 GPUs (4 nodes x 8)" in proc.stdout and "TP=2, PP=1, CP=1, DP=16" in proc.stdout
    assert f"{256 * 8192:,} token slots per step" in proc.stdout
    del recipe["models"]["8b"]
    path.write_text(yaml.safe_dump(recipe))
    bad = _run(["bash", "examples/pretrain_655b.sh", "--dry-run", "--model", "8b", "--recipe", str(path)])
    assert bad.returncode == 2 and "no model '8b' under models" in bad.stderr


def test_pretrain_launch_makes_every_rank_a_slurm_task_that_gets_sigterm(tmp_path):
    """Under Slurm the script asks for SIGTERM 600 s before the time limit and launches one srun task per
    GPU whose process becomes the trainer (exec), with RANK/LOCAL_RANK/WORLD_SIZE from SLURM_*, so
    Slurm's signal reaches the trainer itself (which saves and exits 0), not a torchrun that kills its
    workers 30 s later. A stand-in srun runs task 9 of 16 (node 1, local 1); a stand-in trainer reports.

    Fault caught: a command after the trainer in the task's shell (`...; echo done`: the signalled pid is
    that bash, not the trainer), and RANK taken from SLURM_LOCALID."""
    header = open(os.path.join(REPO, "examples/pretrain_655b.sh")).read().split("set -euo")[0]
    assert "#SBATCH --signal=TERM@600" in header and "#SBATCH --ntasks-per-node=8" in header
    bin_dir, trainer_dir, report = tmp_path / "bin", tmp_path / "trainer", tmp_path / "report"
    bin_dir.mkdir()
    trainer_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node-a\necho node-b\n")
    # srun: run the task command as task 9 of 16, with the trainer stand-in first on PATH; report its pid
    (bin_dir / "srun").write_text(
        "#!/bin/bash\nwhile [ \"$1\" != bash ]; do shift; done\n"
        f"PATH={trainer_dir}:$PATH SLURM_PROCID=9 SLURM_LOCALID=1 SLURM_NTASKS=16 SLURM_NTASKS_PER_NODE=8 "
        f"\"$@\" & echo \"task_pid=$!\" >> {report}; wait $!\n"
    )
    (trainer_dir / "python3").write_text(
        f"#!/bin/bash\necho \"trainer_pid=$$ rank=$RANK local=$LOCAL_RANK world=$WORLD_SIZE "
        f"master=$MASTER_ADDR:$MASTER_PORT args=$*\" >> {report}\n"
    )
    for f in (bin_dir / "scontrol", bin_dir / "srun", trainer_dir / "python3"):
        f.chmod(0o755)
    proc = _run(["bash", "examples/pretrain_655b.sh", "--model", "2b", "--nodes", "2", "--run-dir",
                 str(tmp_path / "run")],
                env_extra={"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node-[a-b]",
                           "PATH": f"{bin_dir}:{os.environ['PATH']}", "MEGASAIL_SYSTEM_PYTHON": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = dict(item.split("=", 1) for item in report.read_text().split() if "=" in item)
    assert lines["task_pid"] == lines["trainer_pid"]  # the signalled task is the trainer
    assert (lines["rank"], lines["local"], lines["world"]) == ("9", "1", "16")
    assert lines["master"] == "node-a:29500"
    assert (tmp_path / "run" / "config.yaml").is_file()


def _llm_forward_2b(tokens: float, pairs: float) -> float:
    """SAIL-VL-2B's LLM forward FLOPs, written out: 28 layers, hidden 1536, 12 heads of 128, 2 KV groups,
    SwiGLU 8960, vocab 151936."""
    per_token = 28 * (2 * 1536 * (12 + 2 * 2) * 128 + 2 * 12 * 128 * 1536 + 2 * 3 * 1536 * 8960)
    per_token += 2 * 1536 * 151936  # logits
    return tokens * per_token + pairs * 28 * 4 * 12 * 128


def _vit_projector_forward_2b(tiles: float) -> tuple[float, float]:
    """(ViT, projector) forward FLOPs of SAIL-VL-2B for ``tiles`` 448px tiles, written out."""
    s, h = 1025, 1024
    vit = 2 * 1024 * 3 * 14 * 14 * h + 24 * (2 * s * (4 * h * h + 2 * h * 4096) + 4 * s * s * h)
    projector = 2 * 256 * (4096 * 1536 + 1536 * 1536)
    return tiles * vit, tiles * projector


def test_plan_flops_are_the_training_loops_executed_flops():
    """Fails if the plan charges a stage other FLOPs than the loop's MFU counts for the same packed
    sequence (e.g. a frozen ViT charged a backward in alignment, padding counted, the trainable set
    ignored, or the frozen LLM's attention core charged 2x)."""
    from megasail.models.presets import sail_vl_2b
    from megasail.plan import sequence_step_flops

    cfg, s, tiles = sail_vl_2b(), 8192, 24
    vit, proj = _vit_projector_forward_2b(tiles)
    length = s * 0.99 / 4  # 4 samples share the row's real tokens; the rest is padding
    linear = _llm_forward_2b(4 * length, 0)
    core = _llm_forward_2b(0, 4 * length * (length + 1) / 2)
    every = ["vision", "projector", "language"]
    assert sequence_step_flops(cfg, s, tiles, 4, every, 0.99).model == pytest.approx(
        3 * (vit + proj + linear + core)
    )
    assert sequence_step_flops(cfg, s, tiles, 4, ["projector"], 0.99).model == pytest.approx(
        vit + 3 * proj + 2 * linear + 3 * core
    )
    assert sequence_step_flops(cfg, s, tiles, 4, ["vision", "projector"], 0.99).model == pytest.approx(
        3 * vit + 3 * proj + 2 * linear + 3 * core
    )


@pytest.mark.parametrize("gpu,peak", [("H100-SXM", 989.0), ("B200", 2250.0)])
def test_plan_times_each_stage_by_its_own_flops_at_one_mfu(gpu, peak):
    """Without a stated tokens/s, each stage's step time is its own step FLOPs at --mfu of the GPU's
    dense peak: the advance stage (ViT trains) takes longer per step than alignment.

    Fails if one tokens/s figure is applied to both stages, or the time ignores the MFU or peak."""
    proc = _run(
        [
            sys.executable,
            "-m",
            "megasail.plan",
            "--config",
            "examples/configs/sail_vl_2b.yaml",
            "--stage",
            "examples/configs/stages/pretrain_alignment.yaml",
            "--stage",
            "examples/configs/stages/pretrain_advance.yaml",
            "--nodes",
            "16",
            "--mfu",
            "0.4",
            "--gpu",
            gpu,
            "--tiles-per-sequence",
            "24",
            "data.seq_length=8192",
            "data.global_batch_size=512",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    rows = _stage_rows(proc.stdout)
    vit, proj = _vit_projector_forward_2b(24)
    length = 8192 * 0.99 / 4
    linear = _llm_forward_2b(4 * length, 0)
    core = _llm_forward_2b(0, 4 * length * (length + 1) / 2)
    per_sequence = {
        "pretrain_alignment": vit + 3 * proj + 2 * linear + 3 * core,
        "pretrain_advance": 3 * vit + 3 * proj + 2 * linear + 3 * core,
    }
    steps = {}
    for name, flops in per_sequence.items():
        step_flops = 512 * flops
        seconds = step_flops / (0.4 * peak * 1e12 * 128)
        cells = rows[name]
        assert _num(cells[4]) == pytest.approx(step_flops / 1e12, abs=0.5), cells
        assert _num(cells[6]) == pytest.approx(seconds, abs=0.006), cells
        assert _num(cells[8]) == pytest.approx(_num(cells[3]) * seconds / 86400, abs=0.006), cells
        steps[name] = seconds
    assert steps["pretrain_advance"] > 1.3 * steps["pretrain_alignment"]


def test_plan_pipeline_layout_bubble_and_sample_budgets():
    """Fails if the 1F1B bubble formula, the ViT-aware first-stage split, or sample-budget iterations are wrong,
    or if a layout that does not divide the GPUs or the batch is accepted."""
    from megasail.config import load_config
    from megasail.data.loader.config import load_stages
    from megasail.models.flops import suggest_first_stage_layers
    from megasail.plan import make_plan

    run = load_config(
        f"{REPO}/examples/configs/sail_vl_8b.yaml",
        ["parallel.tensor=2", "parallel.pipeline=4", "data.seq_length=8192", "data.global_batch_size=64"],
    )
    run.data.stages = load_stages([f"{REPO}/examples/configs/stages/sft_knowledge.yaml"])
    plan = make_plan(run, nodes=2, gpus_per_node=8, samples_per_sequence=4, tokens_per_s_per_gpu=1000)
    assert plan.data_parallel == 2 and plan.micro_batches_per_rank == 32
    assert plan.pipeline_bubble == pytest.approx(3 / (32 + 3))
    assert plan.first_stage_llm_layers == suggest_first_stage_layers(run.model, 4, 8192, 24)
    assert plan.first_stage_llm_layers < 7  # stage 0 also runs the ViT: fewer than 28 / 4 layers
    assert plan.stages[0].iterations == math.ceil(21_000_000 / (64 * 4))
    with pytest.raises(ValueError, match="do not divide"):
        make_plan(run, nodes=1, gpus_per_node=12)
    run.data.global_batch_size = 63
    with pytest.raises(ValueError, match="global_batch_size 63"):
        make_plan(run, nodes=2, gpus_per_node=8)


def _memory_rows(out: str) -> dict[tuple[str, str], list[str]]:
    """Rows of the plan's memory table by (pipeline rank, stage)."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].rstrip(" *").isdigit() and len(cells) == 11:
            rows[(cells[0].rstrip(" *"), cells[1])] = cells
    return rows


def test_pretrain_dry_run_prints_memory_per_gpu():
    """The 2B recipe (TP=1, DP=128, bf16) prints memory per GPU per stage: 2 bytes per parameter for the
    weights, 4 per trained parameter for the fp32 gradient buffer, Adam's 12 bytes per trained parameter
    over 128 DP ranks, and the fp32 logits softmax of an 8192-token micro-batch.

    Fails if frozen parts are given gradients or optimizer state (alignment trains the projector only),
    if the optimizer state is not divided over DP, or the logits are left out."""
    proc = _run(["bash", "examples/pretrain_655b.sh", "--dry-run", "--model", "2b", "--nodes", "16"])
    assert proc.returncode == 0, proc.stderr
    rows, stages = _memory_rows(proc.stdout), _stage_rows(proc.stdout)
    gib, total = 2**30, 2_089_762_304
    for name, trained in (("pretrain_alignment", 8_662_016), ("pretrain_advance", 8_662_016 + 304_012_288)):
        cells = rows[("0", name)]
        assert _num(cells[2].rstrip("B")) == pytest.approx(total / 1e9, abs=1e-3)
        assert _num(cells[3]) == pytest.approx(total * 2 / gib, abs=0.006)
        assert _num(cells[4]) == pytest.approx(trained * 4 / gib, abs=0.006)
        assert _num(cells[5]) == pytest.approx(trained * 12 / 128 / gib, abs=0.006)
        assert _num(cells[7]) == pytest.approx(8192 * 151936 * 4 / gib, abs=0.006)
        assert _num(stages[name][10]) == pytest.approx(_num(cells[10]), abs=0.06)  # the stage table's
    assert "DOES NOT FIT" not in proc.stdout and "WARNING" not in proc.stdout


@pytest.mark.parametrize("gpu,fits", [("H100-SXM", False), ("H200", True)])
def test_plan_flags_a_stage_that_does_not_fit_the_gpu(gpu, fits):
    """SAIL-VL-8B at TP=1: the advance stage (ViT trains on 24 tiles, 8192 tokens) needs about 82 GiB per
    GPU: flagged on an 80 GiB H100 with what to change, not on a 141 GiB H200.

    Fails if the GPU memory table is wrong or a stage above --memory-fraction of it passes unflagged."""
    script = ["bash", "examples/pretrain_655b.sh", "--dry-run", "--model", "8b", "--nodes", "4", "--gpu", gpu]
    proc = _run([*script, "--", "parallel.tensor=1", "parallel.sequence_parallel=false"])
    assert proc.returncode == 0, proc.stderr
    advance = _stage_rows(proc.stdout)["pretrain_advance"]
    assert 0.9 * 80 < _num(advance[10]) < 0.9 * 141
    assert ("DOES NOT FIT" in advance[10]) is not fits
    warning = "WARNING: stage pretrain_advance needs"
    assert (warning in proc.stdout) is not fits
    if not fits:
        assert "raise parallel.tensor or parallel.pipeline" in proc.stdout
    assert "DOES NOT FIT" not in _stage_rows(proc.stdout)["pretrain_alignment"][10]


def _write_metrics(path, rows):
    with open(path, "w") as f:
        for step, (stage, tokens_per_s) in enumerate(rows, 1):
            f.write(json.dumps({"step": step, "stage": stage, "tokens_per_s": tokens_per_s,
                                "loader": {"padding_fraction": 0.2}}) + "\n")


def test_plan_from_metrics_times_each_stage_at_its_steady_median(tmp_path):
    """--from-metrics: each stage's median tokens/s after its first --metrics-skip rows, per GPU of the
    measured run (8 here), times that stage; a stage the metrics do not name takes the median of all
    steady rows; the run's packing efficiency (1 - padding_fraction = 0.8) sets the sample tokens.

    Fails if the warm-up rows stay in the median, one median serves every stage, the rate is not divided
    by --metrics-gpus, or the default packing efficiency is kept."""
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics, [("pretrain_alignment", x) for x in (100, 200, 4000, 4400, 4200)]
                   + [("pretrain_advance", x) for x in (50, 60, 3300, 3100)])
    base = [sys.executable, "-m", "megasail.plan", "--config", "examples/configs/sail_vl_2b.yaml",
            "--nodes", "2", "--stage", "examples/configs/stages/pretrain_alignment.yaml",
            "--stage", "examples/configs/stages/pretrain_advance.yaml",
            "--stage", "examples/configs/stages/sft_knowledge.yaml", "data.global_batch_size=64"]
    proc = _run([*base, "--from-metrics", str(metrics), "--metrics-gpus", "8", "--metrics-skip", "2"])
    assert proc.returncode == 0, proc.stderr
    rows = _stage_rows(proc.stdout)
    sample_tokens = 64 * 8192 * 0.8
    for name, per_gpu in (("pretrain_alignment", 4200 / 8), ("pretrain_advance", 3200 / 8),
                          ("sft_knowledge", 4000 / 8)):
        assert _num(rows[name][6]) == pytest.approx(sample_tokens / (per_gpu * 16), abs=0.006), rows[name]
        assert f"{per_gpu:,.0f} tokens/s per GPU" in rows[name][9] and "metrics.jsonl" in rows[name][9]
    assert "packing efficiency 0.8" in proc.stdout
    missing = _run([*base, "--from-metrics", str(metrics)])
    assert missing.returncode == 2 and "--metrics-gpus" in missing.stderr
    short = _run([*base, "--from-metrics", str(metrics), "--metrics-gpus", "8", "--metrics-skip", "5"])
    assert short.returncode == 2 and "none after the first 5" in short.stderr


@pytest.mark.distributed
def test_sft_curriculum_runs_three_stages_on_cpu(tmp_path):
    """Fails if the SFT recipe does not run knowledge, instruction and preference in that order in one run,
    each to its budget with its own schedule restarting from warmup (a stage keeping the previous stage's
    schedule runs its first step at the peak; a first step at lr 0 wastes it), or if the loss does not fall
    across them."""
    import json

    proc = _run(
        [
            "bash",
            "examples/sft_curriculum.sh",
            "--model",
            "tiny",
            "--nproc",
            "1",
            "--synthetic",
            str(tmp_path / "data"),
            "--run-dir",
            str(tmp_path / "run"),
            "--budget-samples",
            "24",
        ],
        timeout=600,
        env_extra={"MEGASAIL_NO_INSTALL": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "checkpoints" / "metrics.jsonl")]
    assert [r["stage"] for r in rows] == ["sft_knowledge"] * 2 + ["sft_instruction"] * 2 + [
        "sft_preference"
    ] * 2
    # every stage restarts tiny.yaml's 2-step warmup to lr 1e-3: its first step at lr / 2, never at 0
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3] * 3, rel=1e-9)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2
    assert (tmp_path / "run" / "checkpoints" / "iter_0000006").is_dir()


def test_sft_chained_stages_start_from_the_previous_stages_weights(tmp_path):
    """Fails if a chained stage does not name the previous stage's checkpoint (or --init for the first) as its
    init_checkpoint, or if a composed config states keys the recipe did not set (so start-up checks could
    no longer take the tokenizer's ids from the dataset manifest)."""
    from megasail.config import load_config

    run = tmp_path / "chain"
    proc = _run(
        [
            "bash",
            "examples/sft_curriculum.sh",
            "--model",
            "tiny",
            "--nproc",
            "1",
            "--chained",
            "--dry-run",
            "--init",
            "/ckpt/pretrain",
            "--run-dir",
            str(run),
            "--",
            "train.iters=5",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    previous = "/ckpt/pretrain"
    for name in ("sft_knowledge", "sft_instruction", "sft_preference"):
        cfg = load_config(run / f"{name}.yaml")
        assert [s.name for s in cfg.data.stages] == [name]
        assert cfg.data.stages[0].init_checkpoint == previous and cfg.train.iters == 5
        assert (
            "model.image_token_id" not in cfg.explicit_keys and "data.pad_token_id" not in cfg.explicit_keys
        )
        assert f"checkpoint.save={run / name}" in proc.stdout
        previous = str(run / name)
