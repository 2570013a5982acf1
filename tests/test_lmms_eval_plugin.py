"""The lmms-eval plugin (megasail/evaluation/lmms_eval_plugin.py): its answers equal tools/evaluate.py's for
the same questions and pictures; registered through the entry point, lmms-eval's own CLI runs it on a
local task (only where lmms-eval and the packages its CLI imports are installed)."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys

import pytest
from eval_utils import REPO, by_id, read_jsonl, tool_env, write_open_questions

MAX_NEW = 20


@pytest.fixture(scope="module")
def answered(tmp_path_factory):
    """(model dir, benchmark, tools/evaluate.py's predictions by id) on the recaptioning tests' captioner."""
    from recaption_utils import captioning_model_dir, write_image_set

    root = tmp_path_factory.mktemp("plugin")
    model = captioning_model_dir(root / "model")
    names = write_image_set(root / "images", 6)
    bench = write_open_questions(root, [f"images/{n}" for n in names])
    out = root / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "evaluate.py"), "--benchmark", str(bench), "--load", str(model),
         "--output-dir", str(out), "--max-new-tokens", str(MAX_NEW), "--prompt-suffix", "", "--no-progress"],
        capture_output=True, text=True, env=tool_env(), timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model, bench, by_id(out / "open.predictions.jsonl")


def test_adapter_answers_as_the_evaluate_tool(answered):
    """Prompts given as lmms-eval gives them (question text, PIL images, generation kwargs) get the tool's
    predictions; prompts with other kwargs ('until') form their own batch and are cut at the stop string.

    Fault caught: images handed over re-encoded lossily (planted: JPEG instead of PNG in visual_bytes ->
    other pixels, other answers); answers returned in batch order instead of request order (planted:
    answers appended as outcomes arrive -> bucketed order)."""
    from PIL import Image

    from megasail import runtime
    from megasail.evaluation.lmms_eval_plugin import LmmsEvalAdapter, cut_at_stop

    model, bench, expected = answered
    questions = read_jsonl(bench)
    prompts = []
    for k, q in enumerate(questions):
        images = [Image.open(bench.parent / q["image"])] if "image" in q else []
        kwargs = {
            "max_new_tokens": MAX_NEW,
            "temperature": 0,
            "do_sample": False,
            "until": [";"] if k % 3 == 0 else [],
        }
        prompts.append((q["question"], images, kwargs))
    runtime.initialize(1, 1)
    try:
        answers = LmmsEvalAdapter(str(model), batch_size=4).generate(prompts)
    finally:
        runtime.destroy()
    want = [
        cut_at_stop(expected[q["id"]]["prediction"], p[2]["until"])
        for q, p in zip(questions, prompts, strict=True)
    ]
    assert answers == want
    assert any(";" in expected[q["id"]]["prediction"] for k, q in enumerate(questions) if k % 3 == 0)


def test_sampling_settings_from_lmms_eval_kwargs():
    """lmms-eval's generation kwargs map to megasail's: greedy unless do_sample with a temperature > 0,
    'until' as a list, the task's max_new_tokens else the model's default."""
    from megasail.evaluation.lmms_eval_plugin import sampling_from_gen_kwargs

    assert sampling_from_gen_kwargs({"until": "\n\n", "temperature": 0}, 64) == (
        {"max_new_tokens": 64, "greedy": True}, ["\n\n"])  # fmt: skip
    assert sampling_from_gen_kwargs({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 5}, 64) == (
        {"max_new_tokens": 5, "greedy": False, "temperature": 0.7, "top_p": 0.9}, [])  # fmt: skip
    assert sampling_from_gen_kwargs({"do_sample": False, "temperature": 0.7}, 8)[0]["greedy"]


def _lmms_eval_cli_missing() -> str | None:
    """The first module lmms-eval's CLI needs that does not import here (None: all import)."""
    for name in ("lmms_eval.api.model", "lmms_eval.models.registry_v2", "datasets", "accelerate", "evaluate",
                 "sacrebleu", "pytablewriter", "filelock._api"):  # fmt: skip
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def _declared_entry_points() -> dict:
    """setup.py's entry_points argument, read from its source (what pip writes into the metadata)."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == "entry_points"))


@pytest.mark.slow
def test_lmms_eval_cli_runs_the_registered_plugin(answered, tmp_path):
    """`python -m lmms_eval --model megasail --model_args load=DIR` on a local task (a JSON file, offline)
    finds the model through the entry point setup.py declares and scores every answer the tool gave as
    right (the task's target is the tool's prediction, stripped as lmms-eval strips responses).

    Needs lmms-eval with the modules its CLI imports (datasets, accelerate, evaluate, sacrebleu,
    pytablewriter; lmms-eval 0.7.3 also needs filelock < 4 for filelock._api): skipped where one is missing.
    Fault caught: the entry point naming a missing object (planted: manifest renamed -> lmms-eval lists no
    model 'megasail')."""
    missing = _lmms_eval_cli_missing()
    if missing:
        pytest.skip(f"lmms-eval's CLI cannot run here: {missing} does not import")
    model, bench, expected = answered
    site = tmp_path / "site"
    info = site / "megasail_plugin_registration-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: megasail-plugin-registration\nVersion: 0\n")
    groups = _declared_entry_points()
    (info / "entry_points.txt").write_text(
        "".join(f"[{g}]\n" + "\n".join(eps) + "\n" for g, eps in groups.items())
    )
    data = tmp_path / "task" / "open.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"id": q["id"], "question": q["question"], "image": str(bench.parent / q["image"])
                                        if "image" in q else "", "answer": expected[q["id"]]["prediction"].strip()}) + "\n"
                            for q in read_jsonl(bench)))  # fmt: skip
    (tmp_path / "task" / "megasail_open.yaml").write_text(
        f"task: megasail_open\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_visual: !function open_utils.doc_to_visual\n"
        "doc_to_text: !function open_utils.doc_to_text\ndoc_to_target: answer\n"
        f"generation_kwargs:\n  max_new_tokens: {MAX_NEW}\n  temperature: 0\n  do_sample: false\n  until: []\n"
        "process_results: !function open_utils.process_results\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tmp_path / "task" / "open_utils.py").write_text(
        "from PIL import Image\n\n\ndef doc_to_visual(doc):\n    return [Image.open(doc['image'])] if doc['image'] else []\n\n\n"
        "def doc_to_text(doc, lmms_eval_specific_kwargs=None):\n    return doc['question']\n\n\n"
        "def process_results(doc, results):\n    return {'exact_match': float(results[0] == doc['answer'])}\n"
    )
    env = tool_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "megasail", "--model_args", f"load={model}",
         "--tasks", "megasail_open", "--include_path", str(tmp_path / "task"), "--output_path", str(tmp_path / "out"),
         "--batch_size", "4"],
        capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    results = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("*_results.json")]
    assert len(results) == 1, proc.stdout[-2000:]
    task = results[0]["results"]["megasail_open"]
    assert task["exact_match,none"] == 1.0, task
