"""tools/recaption.py end to end: kill -9 and resume at DP=2, bad inputs, and recaption -> preprocess -> train."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
from chat_utils import png_bytes
from recaption_utils import (
    REPO,
    captioning_model_dir,
    id_placement,
    output_lines,
    recaption_cmd,
    run_recaption_tool,
    tool_env,
    write_image_set,
)

from megasail.runtime import free_port

COMMON = ["--batch-size", "2", "--max-new-tokens", "20", "--max-tiles", "4", "--min-caption-tokens", "4",
          "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A JSONL source: 22 good images with carried fields, a corrupt image, a missing file, a broken line."""
    root = tmp_path_factory.mktemp("recaption")
    model = captioning_model_dir(root / "model")
    images = root / "images"
    names = write_image_set(images, 22)
    (images / "corrupt.png").write_bytes(png_bytes(60, 60, seed=9)[:80])  # header intact, pixels cut
    lines = [{"id": f"pic-{i}", "image": name, "url": f"http://example.com/{i}", "caption": f"alt text {i}"}
             for i, name in enumerate(names)]  # fmt: skip
    lines += [{"id": "corrupt", "image": "corrupt.png"}, {"id": "missing", "image": "nowhere/gone.png"}]
    text = "".join(json.dumps(x) + "\n" for x in lines) + "{not json\n"
    (images / "list.jsonl").write_text(text)
    expected = {x["id"] for x in lines} | {"list.jsonl:25"}
    return model, images / "list.jsonl", expected


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """An uninterrupted single-process run of the source."""
    model, jsonl, _ = source
    out = tmp_path_factory.mktemp("reference") / "out"
    proc = run_recaption_tool("--load", model, "--images", jsonl, "--output", out, *COMMON)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def _kill_job(proc) -> None:
    """SIGKILL torchrun and its workers if still running (torchrun starts each worker in a session of
    its own, so killing torchrun's process group alone would leave the workers running)."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def _uncommitted_bytes(out) -> int:
    """Bytes of the output files past what their writers' progress files committed."""
    from megasail.curation.writer import committed_sizes

    try:
        return sum(os.path.getsize(out / name) - size for name, size in committed_sizes(str(out)).items())
    except (OSError, ValueError):  # a file or progress record being replaced right now
        return 0


def _check_every_id_once(out, expected):
    placement = id_placement(out)
    ids = [item_id for item_id, _ in placement.elements()]
    assert sorted(ids) == sorted(expected)  # each input id once, over the three outputs together
    return {item_id: kind for item_id, kind in placement}


def test_reference_run_places_every_id_and_carries_fields(source, reference):
    """One run: every input id in exactly one output, the corrupt image and the missing file in rejects
    after a retry, the broken line in rejects with its place, carried fields on every line (the
    source's own "caption" as source_caption), and a closing summary that adds up.

    Fault caught: a failed image dropped instead of rejected (planted: the retry list never flushed at
    the end -> 'corrupt' and 'missing' in no output)."""
    _, _, expected = source
    out, proc = reference
    where = _check_every_id_once(out, expected)
    lines = output_lines(out)
    rejects = {r["id"]: r for r in lines["rejects"]}
    assert rejects["corrupt"]["reason"] == "image_corrupt" and rejects["corrupt"]["attempts"] == 2
    assert rejects["missing"]["reason"] == "image_missing" and rejects["missing"]["attempts"] == 2
    assert rejects["list.jsonl:25"]["reason"] == "malformed_record"
    kinds = {kind for item_id, kind in where.items() if item_id.startswith("pic-")}
    assert kinds == {"captions", "filtered"}  # the tiny model's captions are kept and filtered
    for line in lines["captions"] + lines["filtered"]:
        assert line["prompt_id"] in ("detailed", "ocr", "short") and line["model"] == "model"
        i = line["id"].split("-")[1]
        assert line["url"] == f"http://example.com/{i}" and line["source_caption"] == f"alt text {i}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["kept"] == len(lines["captions"])
    assert sum(v for k, v in summary["run"].items() if k.startswith("rejected:")) == 3
    assert "| kept |" in proc.stdout and "images/s" in proc.stdout


@pytest.mark.distributed
def test_killed_at_a_random_moment_then_resumed_at_dp2(source, reference, tmp_path):
    """torchrun --nproc-per-node 2 (two data-parallel writers): a seeded random writer SIGKILLs itself
    at a seeded random batch, between writing that batch's lines and committing them (the moment a
    kill can leave lines no progress counts); torchrun then stops the other writer wherever it is.
    After --resume every input id ends in exactly one output, with the same prompt and outcome as
    the uninterrupted single-process run.

    Fault caught: resume trusting bytes past the committed progress (planted: truncate_to_committed
    skipped -> the killed batch's ids appear twice), and progress keyed by position instead of id
    (planted: done ids ignored on resume -> every id done before the kill captioned twice)."""
    model, jsonl, expected = source
    out = tmp_path / "out"
    args = ["--load", model, "--images", jsonl, "--output", out, *COMMON]
    rng = random.Random(7)
    kill_at = f"{rng.randrange(2)}:{rng.randint(2, 4)}"  # each writer commits ~6 batches of 2
    proc = subprocess.Popen(recaption_cmd(*args, nproc=2, port=free_port()), env=tool_env(
        MEGASAIL_RECAPTION_KILL_AT=kill_at), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # fmt: skip
    try:
        proc.wait(timeout=300)
    finally:
        _kill_job(proc)  # whatever torchrun left running
    assert proc.returncode != 0, kill_at
    assert not (out / "summary.json").exists()  # it never finished
    before = sum(id_placement(out).values())
    assert 0 < before < len(expected), before
    assert _uncommitted_bytes(out) > 0  # the killed batch's lines are there, uncommitted

    resumed = run_recaption_tool(*args, "--resume", nproc=2, port=free_port())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    where = _check_every_id_once(out, expected)
    ref_out, _ = reference
    assert where == _check_every_id_once(ref_out, expected)
    prompts = {x["id"]: x["prompt_id"] for k in ("captions", "filtered") for x in output_lines(out)[k]}
    ref_prompts = {x["id"]: x["prompt_id"] for k in ("captions", "filtered") for x in output_lines(ref_out)[k]}
    assert prompts == ref_prompts
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["already_done"] > 0 and summary["writers"] == 2


def test_refuses_existing_output_and_changed_settings(source, reference, tmp_path):
    """Without --resume an existing output is refused; --resume with another seed (other prompts) is
    refused naming the setting; neither touches the output.

    Fault caught: a resume with changed settings mixing two runs' prompts in one output (planted:
    the settings check skipped)."""
    model, jsonl, _ = source
    out, _ = reference
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = run_recaption_tool("--load", model, "--images", jsonl, "--output", out, *COMMON)
    assert again.returncode == 2 and "pass --resume" in again.stderr
    other_seed = run_recaption_tool("--load", model, "--images", jsonl, "--output", out, *COMMON, "--resume",
                                    "--seed", "5")  # fmt: skip
    assert other_seed.returncode == 2 and "seed" in other_seed.stderr and "differ" in other_seed.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.distributed
def test_recaption_then_preprocess_then_one_training_step(source, reference, tmp_path):
    """The kept captions are caption records tools/preprocess_data.py reads with the --image-root the
    summary prints (every kept caption becomes a sample), and pretrain_vlm.py trains a step on them.

    Fault caught: an output "image" preprocessing cannot open (planted: absolute image paths ->
    every record rejected as image_path_outside_root)."""
    model, _, _ = source
    out, proc = reference
    command = next(line for line in proc.stdout.splitlines() if "preprocess_data.py" in line)
    image_root = command.split("--image-root ")[1].split()[0]
    prefix = tmp_path / "data" / "recaptioned"
    pre = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(out / "captions-00000.jsonl"),
         "--image-root", image_root, "--tokenizer", str(model), "--max-tiles", "1", "--max-seq-length", "512",
         "--output-prefix", str(prefix), "--no-progress"],
        cwd=REPO, env=tool_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pre.returncode == 0, pre.stderr[-3000:]
    manifest = json.loads(open(f"{prefix}.manifest.json").read())
    assert manifest["num_samples"] == len(output_lines(out)["captions"]) > 0, manifest
    logdir = tmp_path / "logs"
    train = subprocess.run(
        [sys.executable, "pretrain_vlm.py", "--config", "examples/configs/tiny.yaml", f"data.path={prefix}",
         "train.iters=1", f"logging.dir={logdir}", "data.seq_length=512", "data.num_workers=0", "data.max_tiles=1",
         "data.global_batch_size=2", "data.pack_window=8", "data.pack_chunk_samples=32",
         "model.vision.num_layers=1", "model.language.num_layers=2"],
        cwd=REPO, env=tool_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-4000:]
    metrics = [json.loads(x) for x in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1] and metrics[0]["loss"] > 0


@pytest.mark.slow
def test_bench_recaption_prints_its_table():
    """tools/bench_recaption.py --quick runs the three settings and prints the table."""
    proc = subprocess.run([sys.executable, "tools/bench_recaption.py", "--quick"], cwd=REPO, env=tool_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| batch")]
    assert [r.split(" | ")[0] for r in rows] == ["| batch 1", "| batch 16, in input order", "| batch 16, bucketed"]
    assert "| 1.00x |" in rows[0]


def test_tar_shards_recaption_then_preprocess_reads_members(source, tmp_path):
    """Webdataset shards in, captions out with id SHARD#KEY, image SHARD#MEMBER and the .json fields
    carried; tools/preprocess_data.py reads each kept caption's image out of its shard by that name.

    Fault caught: an image name preprocessing cannot open (planted: image = the member name alone ->
    every sample rejected as image_missing)."""
    import io
    import tarfile

    model, _, _ = source
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"{s:03d}.tar", "w") as tar:
            for k in range(4):
                for name, data in ((f"s{s}k{k}.png", png_bytes(*[(40, 40), (120, 60)][k % 2], seed=10 * s + k)),
                                   (f"s{s}k{k}.json", json.dumps({"url": f"u{s}{k}"}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    proc = run_recaption_tool("--load", model, "--images", shards / "*.tar", "--output", out, *COMMON)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = output_lines(out)
    assert sorted(x["id"] for k in lines for x in lines[k]) == sorted(f"{s:03d}.tar#s{s}k{k}" for s in range(2)
                                                                      for k in range(4))  # fmt: skip
    kept = lines["captions"]
    assert kept and all(x["image"] == f"{x['id']}.png" and x["url"] == f"u{int(x['id'][:3])}{x['id'][-1]}" for x in kept)
    prefix = tmp_path / "data"
    pre = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(out / "captions-00000.jsonl"), "--image-root",
         str(shards), "--tokenizer", str(model), "--max-tiles", "1", "--output-prefix", str(prefix), "--no-progress"],
        cwd=REPO, env=tool_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pre.returncode == 0, pre.stderr[-3000:]
    assert json.loads(open(f"{prefix}.manifest.json").read())["num_samples"] == len(kept)
