"""tools/evaluate.py on a trained tiny checkpoint: the same predictions at batch 1, batch 8 and DP=2,
rescoring without a model, resume after a kill, bad images counted per question, and clear exits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from eval_utils import (
    REPO,
    by_id,
    read_jsonl,
    run_evaluate_tool,
    tool_env,
    train_colour_checkpoint,
    write_colour_benchmark,
)

from megasail.runtime import free_port

COMMON = ["--max-new-tokens", "8", "--no-progress"]
GAP_TOLERANCE = 1e-4  # fp32 rounding moves a logit gap by ~1e-6 between batch shapes; a masking bug by 1e-2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, benchmark file): 30 training steps of the tiny config, 26 questions."""
    root = tmp_path_factory.mktemp("evaluate")
    return train_colour_checkpoint(root), write_colour_benchmark(root / "bench")


@pytest.fixture(scope="module")
def reference(trained, tmp_path_factory):
    """One process, batch 8."""
    ckpt, bench = trained
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = run_evaluate_tool(
        "--benchmark", bench, "--load", ckpt, "--output-dir", out, "--batch-size", "8", *COMMON
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def _scores(out):
    return json.loads((out / "scores.json").read_text())


def test_scores_predictions_and_bad_images(trained, reference):
    """The run writes predictions in benchmark order, scores them, and reports the missing picture and
    the picture cut short as errors of their own questions (exit 0, every other question answered).

    Fault caught: a missing image failing the whole run (planted: load_benchmark(require_images=True)
    in run_evaluation -> exit 2, no predictions); an error dropped instead of counted (planted: error
    records not written -> 'errors' 0)."""
    _, bench = trained
    out, proc = reference
    questions = [r["id"] for r in read_jsonl(bench)]
    predictions = read_jsonl(out / "colours.predictions.jsonl")
    assert [p["id"] for p in predictions] == [q for q in questions if q not in ("gone", "cut")]
    errors = {e["id"]: e for e in read_jsonl(out / "colours.errors.jsonl")}
    assert errors["gone"]["error"] == "image_missing" and "nowhere.png" in errors["gone"]["message"]
    assert errors["cut"]["error"] == "image_corrupt" and set(errors) == {"gone", "cut"}
    result = _scores(out)["benchmarks"]["colours"]
    assert result["n"] == len(questions) and result["missing"] == 2
    assert result["errors"] == 2 and result["error_reasons"] == {"image_corrupt": 1, "image_missing": 1}
    answers = {r["id"]: r["answers"][0] for r in read_jsonl(bench)}
    # the answers are single lower-case words, so VQA accuracy with ten equal answers is an exact match
    right = sum(p["prediction"].strip() == answers[p["id"]] for p in predictions)
    assert result["score"] == pytest.approx(100 * right / len(questions))
    gaps = [p["min_logit_gap"] for p in predictions]
    assert all(g >= 0 for g in gaps) and result["near_ties"] == sum(g < 1e-5 for g in gaps)
    assert "| colours | vqa | 26 |" in proc.stdout
    assert "errors 2 (image_corrupt 1, image_missing 1)" in proc.stdout
    assert "image_missing" in proc.stderr  # each failed question is named in the log


def _in_process(*args) -> int:
    """tools/evaluate.py's main() in this process (loaded by path: an installed `evaluate` package may
    own the module name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("megasail_evaluate_tool", REPO / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main([str(a) for a in args])


@pytest.mark.distributed
def test_same_predictions_at_batch_1_batch_8_and_dp2(trained, reference, tmp_path):
    """Batch 1 (one process) and DP=2 at batch 8 (torchrun, two writers) give the reference's (batch 8,
    one process) predictions for every question but near-ties, whose count each run reports, and the
    same smallest logit gaps to 1e-4; so the same scores.

    Fault caught: padding on the right (planted in Generator.generate: the shorter prompts of a batch
    end in pads -> other answers at batch 8 than at batch 1); a batch of one without the explicit causal
    mask (planted: mask only when padded -> the packed-trained layers attend to the future in the
    prefill, gaps off by 0.055)."""
    ckpt, bench = trained
    ref_out, _ = reference
    one = tmp_path / "batch1"
    assert (
        _in_process("--benchmark", bench, "--load", ckpt, "--output-dir", one, "--batch-size", "1", *COMMON)
        == 0
    )
    dp2 = tmp_path / "dp2"
    proc = run_evaluate_tool("--benchmark", bench, "--load", ckpt, "--output-dir", dp2, "--batch-size", "8",
                             *COMMON, nproc=2, port=free_port())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 writer(s)" in proc.stdout
    reference_predictions = by_id(ref_out / "colours.predictions.jsonl")
    runs = {"batch 1": one, "dp 2": dp2}
    near = set(_scores(ref_out)["benchmarks"]["colours"]["near_tie_ids"])
    for out in runs.values():
        near |= set(_scores(out)["benchmarks"]["colours"]["near_tie_ids"])
    for name, out in runs.items():
        predictions = by_id(out / "colours.predictions.jsonl")
        assert predictions.keys() == reference_predictions.keys(), name
        differ = [i for i, p in predictions.items()
                  if i not in near and p["prediction"] != reference_predictions[i]["prediction"]]  # fmt: skip
        assert differ == [], (name, differ)
        gaps = [
            abs(p["min_logit_gap"] - reference_predictions[i]["min_logit_gap"])
            for i, p in predictions.items()
        ]
        assert max(gaps) < GAP_TOLERANCE, (name, max(gaps))
        if not near:
            assert _scores(out) == _scores(ref_out), name
    print(f"near-ties (gap < 1e-5) over the three runs: {len(near)} of {len(reference_predictions)}")


def test_rescoring_reproduces_scores_without_a_model(trained, reference, tmp_path):
    """--predictions-dir rescores the reference's predictions into the same scores.json, byte for byte,
    without importing torch (no model); a benchmark without predictions there exits 2 naming the file.

    Fault caught: rescoring that reads only NAME.predictions.jsonl (planted: the errors file ignored ->
    errors 0 and error_reasons {} in the rescored scores)."""
    _, bench = trained
    ref_out, _ = reference
    out = tmp_path / "rescored"
    wrapper = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
               "finally:\n    print('torch imported:', 'torch' in sys.modules)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", wrapper, str(REPO / "tools" / "evaluate.py"), "--benchmark",
                           str(bench), "--predictions-dir", str(ref_out), "--output-dir", str(out)],
                          capture_output=True, text=True, env=tool_env(), timeout=120)  # fmt: skip
    assert "torch imported: False" in proc.stdout, proc.stdout + proc.stderr
    assert (out / "scores.json").read_bytes() == (ref_out / "scores.json").read_bytes()
    other = tmp_path / "other.jsonl"
    shutil.copy(bench, other)
    proc = run_evaluate_tool("--benchmark", other, "--predictions-dir", ref_out, "--output-dir", out)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("evaluate: error:")
    assert "other.predictions.jsonl: no predictions" in proc.stderr


def test_rerun_after_a_kill_at_dp2_predicts_only_what_is_left(trained, reference, tmp_path):
    """An output directory as a DP=2 run leaves it when killed (each writer's partial file holds its first
    questions; writer 1's last line is cut off mid-write) is resumed by one process: the questions already
    there are kept as they are (not predicted again), the cut-off one and the rest are predicted, and
    predictions and scores equal an uninterrupted run's. A rerun with other settings is refused.

    Fault caught: a rerun that predicts everything again (planted: the done ids ignored -> all 26 questions
    predicted again); a cut-off line read as a record (planted: repair_partials skipped -> exit 2,
    not valid JSON)."""
    from megasail.curation.split import shard_of

    ckpt, bench = trained
    ref_out, _ = reference
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(ref_out / "evaluate.json", out / "evaluate.json")
    records = read_jsonl(ref_out / "colours.predictions.jsonl")
    kept = set()
    for writer in (0, 1):
        mine = [r for r in records if shard_of(r["id"], 2) == writer][:4]
        kept |= {r["id"] for r in mine[:3]}
        lines = [json.dumps(dict(r, run="first")) + "\n" for r in mine[:3]]
        if writer == 1:
            lines.append(json.dumps(mine[3])[:25])  # killed mid-write
        (out / f"colours.partial-{writer:05d}.jsonl").write_text("".join(lines))
    proc = run_evaluate_tool("--benchmark", bench, "--load", ckpt, "--output-dir", out, *COMMON)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{len(records) + 2 - len(kept)} questions in" in proc.stdout
    assert f"{len(kept)} predicted before this run" in proc.stdout
    predictions = by_id(out / "colours.predictions.jsonl")
    assert {i for i, p in predictions.items() if p.get("run") == "first"} == kept
    reference_predictions = by_id(ref_out / "colours.predictions.jsonl")
    assert {i: p["prediction"] for i, p in predictions.items()} == {
        i: p["prediction"] for i, p in reference_predictions.items()
    }
    assert _scores(out) == _scores(ref_out)
    assert not list(out.glob("*.partial-*"))  # merged into the predictions file

    changed = run_evaluate_tool("--benchmark", bench, "--load", ckpt, "--output-dir", out, "--max-new-tokens", "4",
                                "--no-progress")  # fmt: skip
    assert changed.returncode == 2 and "max_new_tokens" in changed.stderr and "--overwrite" in changed.stderr
    assert by_id(out / "colours.predictions.jsonl") == predictions  # untouched


def test_bad_benchmark_and_checkpoint_exit_2_with_one_line(trained, tmp_path, capsys):
    """A malformed benchmark line, a benchmark file that does not exist and a --load that is no checkpoint
    each end the tool with status 2 and one line naming the file (and line) at fault.

    Fault caught: a checkpoint error escaping as a traceback (planted: EvaluationError not caught in
    main -> the exception propagates instead of returning 2)."""
    ckpt, bench = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text(bench.read_text().splitlines()[0] + "\n{not json\n")
    cases = [
        (["--benchmark", bad, "--load", ckpt], f"{bad}:2: not valid JSON"),
        (["--benchmark", tmp_path / "none.jsonl", "--load", ckpt], "none.jsonl: no such benchmark file"),
        (["--benchmark", bench, "--load", tmp_path], f"--load {tmp_path}: neither a megasail checkpoint"),
    ]
    for args, message in cases:
        assert _in_process(*args, "--output-dir", tmp_path / "out", *COMMON) == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("evaluate: error:")]
        assert len(lines) == 1 and message in lines[0], (message, lines)
    assert not (tmp_path / "out" / "scores.json").exists()


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """(model dir, benchmark, output dir, printed output): the tied-logit captioner answering 24 open
    questions in one process at batch 4."""
    from eval_utils import tied_token_model_dir, write_open_questions
    from recaption_utils import write_image_set

    root = tmp_path_factory.mktemp("tied")
    model = tied_token_model_dir(root / "model")
    names = write_image_set(root / "images", 6)
    bench = write_open_questions(root, [f"images/{n}" for n in names])
    out = root / "out"
    proc = run_evaluate_tool("--benchmark", bench, "--load", model, "--output-dir", out, *TIED_ARGS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return model, bench, out, proc.stdout


TIED_ARGS = ["--max-new-tokens", "20", "--batch-size", "4", "--prompt-suffix", "", "--no-progress"]


def test_near_ties_are_the_answers_holding_a_tied_token(tied):
    """On a HuggingFace directory whose lm_head gives ';' and 'Q' equal logits, the answers counted as
    near-ties in scores.json (and listed by id) are exactly those holding ';' or 'Q', wherever it stands.

    Fault caught: the near-tie gap taken from the first generated token (planted: gaps[0] -> answers with
    ';' later are missed), from the last (planted: gaps[-1], the stop token) or the largest gap (max)."""
    from eval_utils import TIED_CHARS

    _, _, out, stdout = tied
    predictions = read_jsonl(out / "open.predictions.jsonl")
    tied_ids = [p["id"] for p in predictions if any(c in p["prediction"] for c in TIED_CHARS)]
    inside = [p["id"] for p in predictions if ";" in p["prediction"][1:]]
    assert 0 < len(tied_ids) < len(predictions) and inside  # some answers tie after their first token
    result = _scores(out)["benchmarks"]["open"]
    assert result["near_tie_ids"] == tied_ids and result["near_ties"] == len(tied_ids)
    assert f"near-ties {len(tied_ids)}" in stdout  # in the printed table


@pytest.mark.distributed
def test_tensor_parallel_2_gives_the_same_predictions(tied, tmp_path):
    """torchrun with --tensor-parallel 2 (one writer, two ranks generating together) gives the one-process
    predictions, near-ties and scores.

    Fault caught: questions split by global rank instead of data-parallel rank (planted: writer_rank =
    dist.get_rank(), writers = world size -> the group's second rank 'owns' half the questions and
    never predicts them: 9 of 24 answered)."""
    model, bench, out, _ = tied
    tp2 = tmp_path / "tp2"
    proc = run_evaluate_tool("--benchmark", bench, "--load", model, "--output-dir", tp2, "--tensor-parallel", "2",
                             *TIED_ARGS, nproc=2, port=free_port(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "1 writer(s)" in proc.stdout
    one, two = by_id(out / "open.predictions.jsonl"), by_id(tp2 / "open.predictions.jsonl")
    assert {i: p["prediction"] for i, p in two.items()} == {i: p["prediction"] for i, p in one.items()}
    assert _scores(tp2) == _scores(out)
