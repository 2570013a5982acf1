"""Source probing's decisions and launchers without training (tools/probe_sources.py, megasail/curation/probe*.py).

Probes are planted as finished (probe.json, an evaluation's predictions and scores.json) with answers chosen
so that each probe's benchmark average is known; the tool is then run with --collect, which trains nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megasail.curation import probes as probes_mod
from megasail.curation.probe_run import claim
from megasail.evaluation import build_scores, load_benchmark, score_benchmark, write_predictions, write_scores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "probe_sources.py")
QUESTIONS = 40


@pytest.fixture
def setup(tmp_path):
    """Dummy sources (manifests only: nothing trains), a 40-question benchmark, candidates a, b, c."""
    for name in ("base", "a", "b", "c1", "c2"):
        (tmp_path / f"{name}.manifest.json").write_text("{}")
    (tmp_path / "init").mkdir()
    bench = tmp_path / "bench.jsonl"
    lines = [{"id": f"q{i}", "question": "Colour?", "answers": ["red"] * 10} for i in range(QUESTIONS)]
    lines[0]["metric"] = "vqa"
    bench.write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "candidates.yaml").write_text(
        f"a: {{prefix: {tmp_path}/a}}\nb: {{prefix: {tmp_path}/b}}\n"
        f"c: [{{prefix: {tmp_path}/c1}}, {{prefix: {tmp_path}/c2, weight: 3}}]\n"
    )
    (tmp_path / "base.yaml").write_text(f"sources: [{{prefix: {tmp_path}/base, weight: 1.0}}]\n")
    return tmp_path


def _args(root, mode, *extra, budget=40):
    return ["--base-config", os.path.join(REPO, "examples/configs/tiny.yaml"), "--init", str(root / "init"),
            "--candidates", str(root / "candidates.yaml"), "--benchmark", str(root / "bench.jsonl"),
            "--base-mixture", str(root / "base.yaml"), "--budget-samples", str(budget), "--mode", mode,
            "--out", str(root / "probes"), "--resamples", "200", "--no-progress", *extra]  # fmt: skip


def _tool():
    """tools/probe_sources.py as a module (run in-process: a subprocess pays torch's import each time)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_sources_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Run:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _main(argv, capsys) -> _Run:
    capsys.readouterr()
    code = _tool().main(argv)
    captured = capsys.readouterr()
    return _Run(code, captured.out, captured.err)


def _settings(root, mode, **kw):
    probe_sources = _tool()
    args = probe_sources.parse_args(_args(root, mode))
    settings = probe_sources.settings_from_args(args)
    for k, v in kw.items():
        setattr(settings, k, v)
    return settings


def plant(settings, probe, right: int, step: int = 12) -> None:
    """Make `probe` finished with `right` of the benchmark's questions answered correctly (score 2.5 x right)."""
    directory = claim(settings.out, probe, settings)
    eval_dir = os.path.join(directory, "eval", f"iter_{step:07d}")
    os.makedirs(eval_dir)
    bench = load_benchmark(settings.benchmarks[0], require_images=False)
    predictions = {it.id: ("red" if i < right else "blue") for i, it in enumerate(bench.items)}
    write_predictions(eval_dir, bench.name, predictions)
    write_scores(eval_dir, build_scores({bench.name: score_benchmark(bench, predictions)}))
    with open(os.path.join(eval_dir, "evaluate.json"), "w") as f:
        json.dump({"benchmarks": {bench.name: {"path": bench.path, "metric": "vqa", "prompt_suffix": ""}}}, f)
    os.symlink(os.path.join("eval", f"iter_{step:07d}", "scores.json"), os.path.join(directory, "scores.json"))


def _collect(capsys, root, mode, *extra, check=True):
    proc = _main(_args(root, mode, "--collect", *extra), capsys)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_incremental_keeps_what_holds_the_average_and_writes_the_kept_stage(setup, capsys):
    """a raises the average (kept), b lowers it (dropped: c is then probed without b), c holds it within
    the tolerance (kept); the stage file holds base + a + c. Fault caught: the tolerance ignored (kept only
    when the average does not fall) drops c."""
    s = _settings(setup, "incremental")
    plant(s, probes_mod.baseline_probe(s), right=20)
    plant(s, probes_mod.incremental_probe(s, 1, [], "a"), right=30)
    plant(s, probes_mod.incremental_probe(s, 2, ["a"], "b"), right=10)
    plant(s, probes_mod.incremental_probe(s, 3, ["a"], "c"), right=29)  # 2.5 points below base + a
    stage = setup / "stage.yaml"
    _collect(capsys, setup, "incremental", "--tolerance", "3", "--write-stage", str(stage))
    summary = json.loads((setup / "probes" / "summary.json").read_text())
    assert [(d["candidate"], d["decision"]) for d in summary["decisions"]] == [
        ("a", "kept"), ("b", "dropped"), ("c", "kept")]  # fmt: skip
    assert summary["kept"] == ["a", "c"] and summary["dropped"] == ["b"]
    assert summary["decisions"][0]["difference"] == pytest.approx(25.0)
    assert summary["decisions"][1]["reference"] == "inc01_a"
    import yaml

    written = yaml.safe_load(stage.read_text())
    owners = sorted({x["name"].split("/")[0] for x in written["sources"]})
    assert owners == ["a", "base", "c"]
    assert sum(x["weight"] for x in written["sources"]) == pytest.approx(1.0)
    # without the tolerance c's 2.5-point loss drops it
    _collect(capsys, setup, "incremental", "--tolerance", "0")
    summary = json.loads((setup / "probes" / "summary.json").read_text())
    assert summary["kept"] == ["a"] and summary["dropped"] == ["b", "c"]


def test_quality_ranks_and_pairs_the_gain_interval(setup, capsys):
    """Ranks follow the averages; a probe answering exactly as the baseline has gain 0 with interval [0, 0];
    a better one's interval lies above 0, a worse one's below. Fault caught: the gain taken as baseline minus
    probe puts b's interval below 0."""
    s = _settings(setup, "quality")
    plant(s, probes_mod.baseline_probe(s), right=20)
    a, b, c = probes_mod.quality_probes(s)
    plant(s, a, right=20)
    plant(s, b, right=36)
    plant(s, c, right=8)
    out = _collect(capsys, setup, "quality").stdout
    summary = json.loads((setup / "probes" / "summary.json").read_text())
    by_name = {p["name"]: p for p in summary["probes"]}
    assert [by_name[n]["rank"] for n in ("b", "a", "c")] == [1, 2, 3]
    assert by_name["a"]["gain"]["difference"] == 0 and by_name["a"]["gain"]["interval"] == [0.0, 0.0]
    assert by_name["b"]["gain"]["interval"][0] > 0
    assert by_name["c"]["gain"]["interval"][1] < 0
    assert "| c | base 0.50 + c 0.50 | 20.00 | 20.00 | -30.00 [" in out


def test_halving_reports_each_half_worth(setup, capsys):
    """c has two sources: a probe without each; a half's worth is 'all' minus the probe without it.
    Fault caught: the difference taken the other way round reports the harmful half as worth points."""
    s = _settings(setup, "halving")
    plan = probes_mod.planned_probes(s)
    assert [p.name for p in plan] == ["baseline", "all", "c_without_half1", "c_without_half2"]
    without1 = {x["prefix"] for x in plan[2].sources}
    assert str(setup / "c1") not in without1 and str(setup / "c2") in without1
    for probe, right in zip(plan, (20, 30, 32, 22), strict=True):
        plant(s, probe, right=right)
    _collect(capsys, setup, "halving")
    summary = json.loads((setup / "probes" / "summary.json").read_text())
    worth = {h["half"]: h["worth"] for h in summary["halves"]}
    assert worth == {1: pytest.approx(-5.0), 2: pytest.approx(20.0)}


def test_a_changed_setting_is_refused_and_collect_leaves_pending_probes(setup, capsys):
    """Rerunning into the same --out with another budget is refused naming the key; collect lists the
    probes that have not finished as pending. Fault caught: without the spec check a finished probe of
    another budget would be reported as this one's."""
    s = _settings(setup, "quality")
    plant(s, probes_mod.baseline_probe(s), right=20)
    plant(s, probes_mod.quality_probes(s)[0], right=24)
    out = _collect(capsys, setup, "quality").stdout
    assert "| b | base 0.50 + b 0.50 |  | pending |" in out
    proc = _main(_args(setup, "quality", "--collect", budget=80), capsys)
    assert proc.returncode == 2 and "budget_samples differ" in proc.stderr, proc.stderr


def test_bad_candidates_file_names_the_entry(setup, capsys):
    """A source without a dataset is refused before anything runs, naming file, candidate and prefix.
    Fault caught: without the manifest check the tool goes on and reports a pending table (exit 0)."""
    (setup / "candidates.yaml").write_text(f"a: {{prefix: {setup}/nowhere}}\n")
    proc = _collect(capsys, setup, "quality", check=False)
    assert proc.returncode == 2
    assert "candidates.yaml: candidate 'a' source 0: no dataset at" in proc.stderr and "nowhere" in proc.stderr


def test_slurm_array_script_runs_one_probe_per_task(setup, capsys):
    """--launcher slurm writes an array of the planned probes, task k running probe k with --only; the script
    is valid bash and each task's command names its probe. Fault caught: an array range one too long (a task
    with no probe)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = _main(_args(setup, "quality", "--launcher", "slurm", "--sbatch-arg=--time=1:00:00"), capsys)
    assert proc.returncode == 0, proc.stderr
    script = setup / "probes" / "probes.sbatch"
    text = script.read_text()
    assert "#SBATCH --array=0-3" in text and "#SBATCH --time=1:00:00" in text and "--collect" in proc.stdout
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    # run each task with python replaced by echo: the command it would run
    fake = text.replace(sys.executable, "echo")
    for task, name in enumerate(["baseline", "a", "b", "c"]):
        ran = subprocess.run(["bash", "-c", fake], capture_output=True, text=True,
                             env=dict(env, SLURM_ARRAY_TASK_ID=str(task)))  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.split()[-2:] == ["--only", name]
    assert _main(_args(setup, "incremental", "--launcher", "slurm"), capsys).returncode == 0
    text = script.read_text()
    assert "--array" not in text and "--only" not in text and "--mode incremental" in text


def test_rerun_trains_nothing_when_every_probe_finished(setup, capsys):
    """A rerun (not --collect) of a finished quality run starts no training or evaluation and leaves every
    file as it was. Fault caught: the finished-probe skip removed (the rerun launches pretrain_vlm.py on the
    dummy sources and fails)."""
    s = _settings(setup, "quality")
    plant(s, probes_mod.baseline_probe(s), right=20)
    for probe, right in zip(probes_mod.quality_probes(s), (24, 16, 20), strict=True):
        plant(s, probe, right=right)

    def files():
        root = setup / "probes"
        return {str(p.relative_to(root)): p.lstat().st_mtime_ns for p in root.rglob("*")
                if p.name != "summary.json"}  # fmt: skip

    before = files()
    proc = _main(_args(setup, "quality"), capsys)
    assert proc.returncode == 0, proc.stderr
    assert files() == before
    assert "training" not in proc.stdout and "evaluating" not in proc.stdout
