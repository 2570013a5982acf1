"""tools/preprocess_data.py end to end: round trip, bad records, determinism, kill -9 + resume."""

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fixtures.multimodal_data import (
    QWEN_TOKENIZER_DIR,
    conversation,
    good_conversation_records,
    image_bytes,
    make_tiny_tokenizer,
    write_images,
    write_jsonl,
    write_webdataset,
)
from PIL import Image
from process_utils import assert_all_die, descendants

from megasail.data.format.reader import IndexedMultimodalDataset
from megasail.data.images.tiling import num_image_tokens
from megasail.data.preprocess import PreprocessConfig, run_preprocess
from megasail.data.preprocess.config import config_help
from megasail.data.preprocess.run import FINAL_SUFFIXES, reconcile
from megasail.data.text.template import Conversation, Turn, get_template, render_text
from megasail.data.text.tokenizer import MultimodalTokenizer

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
MAX_TILES = 2


def tool_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def run_tool(script: str, *args, env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOLS / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env or tool_env(),
        timeout=timeout,
    )


def prefix_files(prefix) -> dict:
    return {s: Path(str(prefix) + s).read_bytes() for s in FINAL_SUFFIXES}


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Conversation, caption and text JSONL plus a webdataset tar; expected samples in write order."""
    root = tmp_path_factory.mktemp("inputs")
    images = {
        "a.jpg": image_bytes("JPEG", 64, 48, 1),
        "b.png": image_bytes("PNG", 30, 90, 2),
        "c.webp": image_bytes("WEBP", 500, 300, 3),
        "d.gif": image_bytes("GIF", 40, 40, 4),
    }
    write_images(str(root / "imgs"), images)
    conv = good_conversation_records(7, ["a.jpg", "b.png", "c.webp", "d.gif"])
    conv.append(conversation(["a.jpg", "b.png"], "First <image> then <image>?", "Two.", id="multi"))
    conv.append(
        {
            "id": "sys",
            "conversations": [
                {"from": "system", "value": "Be terse."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Yo"},
            ],
        }
    )
    caption = [
        {"image": "c.webp", "caption": "Noise, in WebP."},
        {"image": "a.jpg", "text": "Noise as text."},
    ]
    text = [{"text": "A text-only document."}]
    tar_samples = [
        {"jpg": image_bytes("JPEG", 80, 60, 5), "txt": b"tar caption one"},
        {"png": image_bytes("PNG", 20, 20, 6), "json": b'{"caption": "from json", "url": "x"}'},
    ]
    paths = [
        write_jsonl(str(root / "conv.jsonl"), conv),
        write_jsonl(str(root / "cap.jsonl"), caption),
        write_jsonl(str(root / "text.jsonl"), text),
        write_webdataset(str(root / "shard.tar"), tar_samples),
    ]
    expected = []  # (source_id, Conversation, template, [raw image bytes])
    for rec in conv:
        turns = tuple(
            Turn({"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), t["value"])
            for t in rec["conversations"]
        )
        names = [rec["image"]] if isinstance(rec.get("image"), str) else rec.get("image", [])
        expected.append((0, Conversation(turns, len(names)), "sailvl-chat", [images[n] for n in names]))
    for rec in caption:
        text_ = rec.get("caption", rec.get("text"))
        expected.append(
            (1, Conversation((Turn("assistant", text_),), 1, "caption"), "caption", [images[rec["image"]]])
        )
    expected.append((2, Conversation((Turn("assistant", text[0]["text"]),), 0, "text"), "text", []))
    expected.append(
        (
            3,
            Conversation((Turn("assistant", "tar caption one"),), 1, "caption"),
            "caption",
            [tar_samples[0]["jpg"]],
        )
    )
    expected.append(
        (3, Conversation((Turn("assistant", "from json"),), 1, "caption"), "caption", [tar_samples[1]["png"]])
    )
    return {"root": root, "paths": paths, "image_root": str(root / "imgs"), "expected": expected}


def _config(inputs, tokenizer, prefix, **kw) -> PreprocessConfig:
    return PreprocessConfig(
        inputs=inputs["paths"],
        output_prefix=str(prefix),
        tokenizer=tokenizer,
        image_root=inputs["image_root"],
        max_tiles=MAX_TILES,
        lines_per_unit=4,
        progress=False,
        **kw,
    )


def test_round_trip_every_sample(inputs, tiny_tokenizer, tmp_path):
    prefix = tmp_path / "ds"
    manifest = run_preprocess(_config(inputs, tiny_tokenizer, prefix))["manifest"]
    tok = MultimodalTokenizer.load(tiny_tokenizer)
    ds = IndexedMultimodalDataset(str(prefix))
    expected = inputs["expected"]
    assert len(ds) == manifest["num_samples"] == len(expected)
    assert manifest["counts"]["rejected"] == 0 and manifest["counts"]["reencoded_images"] == 3
    assert manifest["image_token_ids"] == tok.image_token_ids.as_dict()
    for i, (source_id, conv, template, raw_images) in enumerate(expected):
        sample = ds[i]
        assert sample.source == source_id
        sizes = [Image.open(io.BytesIO(raw)).size for raw in raw_images]
        pieces = get_template(template).render(conv)
        image_tokens = [num_image_tokens(w, h, MAX_TILES) for w, h in sizes]
        expanded = ds.expand(i, MAX_TILES)
        # independent reference: the whole rendered string tokenized at once, special tokens parsed
        assert expanded.input_ids.tolist() == tok.encode_with_special_tokens(
            render_text(pieces, image_tokens)
        )
        answers = "".join(t.text + "<|im_end|>" for t in conv.turns if t.role == "assistant")
        assert tok.decode(expanded.input_ids[expanded.loss_mask].tolist()) == answers
        assert len(sample.images) == len(raw_images)
        for ref, raw, (w, h) in zip(sample.images, raw_images, sizes, strict=True):
            assert (ref.width, ref.height) == (w, h)
            if raw[:3] == b"\xff\xd8\xff" or raw[:4] == b"\x89PNG":
                assert bytes(ref.data) == raw  # JPEG and PNG kept byte for byte
            else:  # re-encoded losslessly to PNG: same pixels as the original decodes to
                assert ref.format == 2 and bytes(ref.data[:4]) == b"\x89PNG"
                original = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
                assert np.array_equal(
                    np.asarray(Image.open(io.BytesIO(bytes(ref.data))).convert("RGB")), original
                )
    assert np.array_equal(
        ds.token_counts(MAX_TILES), [len(ds.expand(i, MAX_TILES).input_ids) for i in range(len(ds))]
    )
    assert manifest["tokens"]["total_at_max_tiles"] == int(ds.token_counts(MAX_TILES).sum())

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    mc = IndexedDataset(str(prefix), multimodal=True)
    assert len(mc) == sum(len(ds[i].segment_modes) for i in range(len(ds)))
    assert len(mc.document_indices) == len(ds) + 1
    # (megatron-core's `sequence_modes` property asserts on an array's truth value; read the index directly)
    assert np.array_equal(
        mc.index.sequence_modes, np.concatenate([ds[i].segment_modes for i in range(len(ds))])
    )
    tokens, mode = mc[0]
    assert np.array_equal(tokens, ds[0].segment_tokens[0]) and mode == ds[0].segment_modes[0]


def _truncated_jpeg() -> bytes:
    data = image_bytes("JPEG", 64, 48, 9)
    return data[: len(data) // 2]


def test_bad_records_are_reported_and_counts_reconcile(tmp_path):
    """Real Qwen tokenizer; one record of every bad kind between good ones; exit 0."""
    write_images(
        str(tmp_path / "imgs"),
        {
            "ok.jpg": image_bytes("JPEG"),
            "trunc.jpg": _truncated_jpeg(),
            "text.jpg": b"this is not an image",
            "empty.png": b"",
            "big.png": image_bytes("PNG", 200, 200),
            "png_named.jpg": image_bytes("PNG"),
        },
    )
    good = conversation("ok.jpg", "<image>\nWhat?", "Noise.")
    bad = {
        2: (b'{"conversations": [', "malformed_json"),
        3: (b'{"text": "caf\xe9"}', "invalid_utf8"),
        4: (b'{"text": "nul\\u0000byte"}', "invalid_text"),
        5: ({"id": "x"}, "missing_field"),
        6: ({"conversations": []}, "empty_conversation"),
        7: (conversation("ok.jpg", "<image><image> two tags", "a"), "image_tag_mismatch"),
        8: (conversation("nope.jpg", "q", "a"), "image_missing"),
        9: (conversation("trunc.jpg", "q", "a"), "image_corrupt"),
        10: (conversation("text.jpg", "q", "a"), "image_unsupported"),
        11: (conversation("empty.png", "q", "a"), "image_empty"),
        12: (conversation("big.png", "q", "a"), "image_too_large"),
        13: (conversation(None, "q", "word " * 400), "too_long"),
        14: (b'{"text": "' + b"x" * 5000 + b'"}', "line_too_long"),
        15: ({"conversations": [{"from": "robot", "value": "hi"}]}, "malformed_record"),
    }
    lines = (
        [good]
        + [bad[n][0] for n in sorted(bad)]
        + [conversation("png_named.jpg", "q", "PNG bytes, .jpg name")]
    )
    jsonl = write_jsonl(str(tmp_path / "mixed.jsonl"), lines)
    tar = write_webdataset(str(tmp_path / "broken.tar"), [{"jpg": image_bytes("JPEG"), "txt": b"fine"}] * 3)
    import tarfile

    with tarfile.open(tar) as t:
        cut = t.getmembers()[4].offset_data + 100  # inside the third sample's image
    Path(tar).write_bytes(Path(tar).read_bytes()[:cut])
    prefix = tmp_path / "out" / "ds"
    result = run_tool(
        "preprocess_data.py",
        "--input",
        tmp_path / "mix*.jsonl",  # a glob
        "--input",
        tar,
        "--image-root",
        tmp_path / "imgs",
        "--tokenizer",
        QWEN_TOKENIZER_DIR,
        "--output-prefix",
        prefix,
        "--max-tiles",
        1,
        "--max-seq-length",
        300,
        "--max-image-pixels",
        10000,
        "--max-line-bytes",
        4096,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads(Path(f"{prefix}.manifest.json").read_text())
    rejects = [json.loads(line) for line in Path(f"{prefix}.rejects.jsonl").read_text().splitlines()]
    by_location = {r["location"]: r for r in rejects}
    for line_no, (_, reason) in bad.items():
        r = by_location[f"{jsonl}:{line_no}"]
        assert r["reason"] == reason and r["message"].startswith(f"{jsonl}:{line_no}: ")
    assert [r["reason"] for r in rejects if r["source"] == tar] == ["archive_corrupt"]
    assert "nope.jpg' not found (relative to --image-root" in by_location[f"{jsonl}:8"]["message"]
    assert by_location[f"{jsonl}:8"]["id"] == "q"  # the record's own id travels with its reject
    jsonl_source, tar_source = manifest["sources"]
    assert (jsonl_source["read"], jsonl_source["written"], jsonl_source["rejected"]) == (
        len(lines),
        2,
        len(bad),
    )
    assert (tar_source["read"], tar_source["written"], tar_source["rejected"]) == (3, 2, 1)
    assert not any(reconcile(manifest).values())
    assert sum(manifest["rejected_by_reason"].values()) == manifest["counts"]["rejected"] == len(rejects)
    ds = IndexedMultimodalDataset(str(prefix))
    assert len(ds) == manifest["counts"]["written"] == 2 + tar_source["written"]
    assert ds[1].images[0].format == 2  # PNG bytes under a .jpg name stay PNG
    assert "image_too_large" in result.stdout and f"{prefix}.rejects.jsonl" in result.stdout


def test_truncate_cuts_text_never_an_image(tmp_path, tiny_tokenizer):
    write_images(str(tmp_path), {"a.jpg": image_bytes("JPEG", 64, 48)})
    jsonl = write_jsonl(
        str(tmp_path / "in.jsonl"),
        [
            conversation("a.jpg", "<image>\nq", "long answer " * 200),
            conversation("a.jpg", "long question " * 200 + "<image>", "a"),
        ],
    )
    cfg = PreprocessConfig(
        inputs=[jsonl],
        output_prefix=str(tmp_path / "ds"),
        tokenizer=tiny_tokenizer,
        max_tiles=1,
        max_seq_length=400,
        on_too_long="truncate",
        progress=False,
    )
    manifest = run_preprocess(cfg)["manifest"]
    assert manifest["counts"] == {
        "read": 2,
        "written": 1,
        "rejected": 1,
        "internal_errors": 0,
        "truncated": 1,
        "reencoded_images": 0,
    }
    assert manifest["rejected_by_reason"] == {"too_long": 1}
    sample = IndexedMultimodalDataset(str(tmp_path / "ds")).expand(0, 1)
    assert len(sample.input_ids) == 400 and sample.loss_mask[-1]


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def unit_run_args(jsonl, image_root, tokenizer) -> list:
    """Arguments of a small multi-unit run (4 lines per unit) without a progress bar."""
    return [
        "--input",
        jsonl,
        "--image-root",
        image_root,
        "--tokenizer",
        tokenizer,
        "--max-tiles",
        MAX_TILES,
        "--lines-per-unit",
        4,
        "--no-progress",
    ]


def test_kill9_then_resume_and_two_workers_give_identical_bytes(tmp_path, tiny_tokenizer):
    write_images(str(tmp_path / "imgs"), {f"{k}.jpg": image_bytes("JPEG", 40 + k, 30, k) for k in range(4)})
    jsonl = write_jsonl(
        str(tmp_path / "in.jsonl"),
        good_conversation_records(39, [f"{k}.jpg" for k in range(4)]) + [b"{broken"],
    )
    common = unit_run_args(jsonl, tmp_path / "imgs", tiny_tokenizer)
    ref = tmp_path / "ref" / "ds"
    assert run_tool("preprocess_data.py", *common, "--output-prefix", ref).returncode == 0

    two = tmp_path / "two" / "ds"
    result = run_tool("preprocess_data.py", *common, "--output-prefix", two, "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert prefix_files(two) == prefix_files(ref)

    killed = tmp_path / "killed" / "ds"
    parts = Path(f"{killed}.parts")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(TOOLS / "preprocess_data.py"),
            *map(str, common),
            "--output-prefix",
            str(killed),
        ],
        env=tool_env(MEGASAIL_PREPROCESS_UNIT_DELAY="2.0"),  # units outlast a loaded machine's polling
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait_for(lambda: len(list(parts.glob("*.report.json"))) >= 2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not Path(f"{killed}.manifest.json").exists()  # never looks complete
    finished = len(list(parts.glob("*.report.json")))
    assert 2 <= finished < 8
    fresh = run_tool("preprocess_data.py", *common, "--output-prefix", killed)
    assert fresh.returncode == 2 and "--resume" in fresh.stderr  # refuses to clobber without being asked
    # Ctrl-C during a resumed attempt: exit 130, still no manifest, finished units kept
    proc = subprocess.Popen(
        [
            sys.executable,
            str(TOOLS / "preprocess_data.py"),
            *map(str, common),
            "--output-prefix",
            str(killed),
            "--resume",
        ],
        env=tool_env(MEGASAIL_PREPROCESS_UNIT_DELAY="5.0"),  # >= 3 units left, 2 at a time: one still runs
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert _wait_for(lambda: len(list(parts.glob("*.report.json"))) > finished)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume" in err
    assert not Path(f"{killed}.manifest.json").exists()
    finished = len(list(parts.glob("*.report.json")))
    report = tmp_path / "report.json"
    resumed = run_tool(
        "preprocess_data.py", *common, "--output-prefix", killed, "--resume", "--report-json", report
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(report.read_text())["runtime"]["units_resumed"] == finished
    assert prefix_files(killed) == prefix_files(ref)
    assert not parts.exists()


KILL_POINTS = [
    "merge:2",
    pytest.param("finish", marks=pytest.mark.slow),
    "publish",
    pytest.param("rejects", marks=pytest.mark.slow),
    "manifest",
    "random:0",
    pytest.param("random:1", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def kill_run(tmp_path_factory, tiny_tokenizer):
    """A 6-unit run's arguments and the bytes of its uninterrupted output."""
    root = tmp_path_factory.mktemp("kill")
    write_images(str(root / "imgs"), {f"{k}.jpg": image_bytes("JPEG", 40 + k, 30, k) for k in range(4)})
    jsonl = write_jsonl(
        str(root / "in.jsonl"), good_conversation_records(23, [f"{k}.jpg" for k in range(4)]) + [b"{broken"]
    )
    common = unit_run_args(jsonl, root / "imgs", tiny_tokenizer)
    ref = root / "ref" / "ds"
    assert run_tool("preprocess_data.py", *common, "--output-prefix", ref).returncode == 0
    # how long the run to be killed takes uninterrupted here, so random kill times fall inside it
    started = time.perf_counter()
    timed = subprocess.run(
        [sys.executable, str(TOOLS / "preprocess_data.py"), *map(str, common), "--output-prefix",
         str(root / "timed" / "ds"), "--workers", "2"],
        env=tool_env(MEGASAIL_PREPROCESS_UNIT_DELAY="0.1"), capture_output=True, check=False,
    )
    assert timed.returncode == 0, timed.stderr[-2000:]
    return common, prefix_files(ref), time.perf_counter() - started


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_anywhere_then_resumed_gives_identical_bytes(tmp_path, kill_run, point):
    """SIGKILL of a --workers 2 run (main process and its unit workers) while units run and merge
    (merge:2), just before the merge finishes, while the merged files are renamed into place (publish),
    between the rejects and the manifest, after the manifest, and at two seeded random moments; then
    --resume --workers 2 gives the uninterrupted run's bytes, and leaves no .tmp or .parts behind.
    The merger renames its data files, then its indexes, within microseconds, so "publish" is the state
    of a kill between the two: a run killed after its rejects, wound back to data files published,
    indexes still .tmp, no rejects.

    Fails if resume trusts a half-published output of the killed run (planted: resume skipping the merge
    when PREFIX.bin exists), if a kill after the manifest leaves .parts/ behind (planted: no cleanup on
    resuming a finished prefix), or if a prefix without its manifest looks complete. The unit workers
    and the resource tracker die with the main process (only it is killed; planted: no die_with_parent
    in the pool initializer)."""
    common, expected, duration = kill_run
    prefix = tmp_path / "ds"
    env = tool_env(MEGASAIL_PREPROCESS_UNIT_DELAY="0.1")
    delay = None
    if point.startswith("random:"):  # a seeded share of an uninterrupted run: start-up, units or merge
        delay = duration * random.Random(13).sample([x / 100 for x in range(15, 70)], 2)[int(point.split(":")[1])]
    else:
        env["MEGASAIL_PREPROCESS_KILL_AT"] = "rejects" if point == "publish" else point
    argv = [
        sys.executable,
        str(TOOLS / "preprocess_data.py"),
        *map(str, common),
        "--output-prefix",
        str(prefix),
    ]
    proc = subprocess.Popen(
        [*argv, "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the unit workers are killed with it
    )
    seen: dict[int, object] = {}  # every process the run started, for the check that none outlives it
    deadline = time.monotonic() + (delay or 120)
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update((p.pid, p) for p in descendants(proc.pid))
            time.sleep(0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert_all_die(list(seen.values()), timeout=5.0, what="unit workers or resource trackers")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == -signal.SIGKILL, (point, proc.returncode)  # killed before it finished
    if point != "manifest":  # an unfinished prefix never looks complete
        assert not Path(f"{prefix}.manifest.json").exists()
    if point == "publish":
        os.remove(f"{prefix}.rejects.jsonl")
        for suffix in (".idx", ".img.idx"):
            os.replace(f"{prefix}{suffix}", f"{prefix}{suffix}.tmp")
    resumed = run_tool("preprocess_data.py", *common, "--output-prefix", prefix, "--resume", "--workers", 2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert prefix_files(prefix) == expected
    leftovers = [p.name for p in prefix.parent.iterdir() if p.name.endswith((".tmp", ".parts"))]
    assert not leftovers, leftovers


def test_stops_before_any_work(tmp_path, tiny_tokenizer):
    jsonl = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": "hello"}])
    base = ["--input", jsonl, "--tokenizer", tiny_tokenizer, "--no-progress"]
    prefix = tmp_path / "ds"
    assert run_tool("preprocess_data.py", *base, "--output-prefix", prefix).returncode == 0
    before = prefix_files(prefix)
    r = run_tool("preprocess_data.py", *base, "--output-prefix", prefix)
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr
    assert prefix_files(prefix) == before
    assert run_tool("preprocess_data.py", *base, "--output-prefix", prefix, "--overwrite").returncode == 0

    (tmp_path / "file").write_text("x")
    r = run_tool("preprocess_data.py", *base, "--output-prefix", tmp_path / "file" / "ds")
    assert r.returncode == 2 and "cannot write to" in r.stderr
    r = run_tool(
        "preprocess_data.py", "--input", jsonl, "--tokenizer", tmp_path, "--output-prefix", tmp_path / "o"
    )
    assert r.returncode == 2 and "neither tokenizer.json nor" in r.stderr
    r = run_tool(
        "preprocess_data.py", *base, "--input", tmp_path / "missing*.jsonl", "--output-prefix", tmp_path / "o"
    )
    assert r.returncode == 2 and "matches no file" in r.stderr
    assert not list(tmp_path.glob("o.*"))


def test_resume_refuses_changed_settings(tmp_path, tiny_tokenizer):
    jsonl = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": "hello"}])
    cfg = PreprocessConfig(
        inputs=[jsonl], output_prefix=str(tmp_path / "ds"), tokenizer=tiny_tokenizer, progress=False
    )
    parts = tmp_path / "ds.parts"
    parts.mkdir()
    from megasail.data.preprocess.run import plan_run

    plan = plan_run(PreprocessConfig(**{**cfg.__dict__, "resume": True}))
    (parts / "plan.json").write_text(
        json.dumps({**plan.fingerprint, "settings": {**plan.fingerprint["settings"], "max_tiles": 6}})
    )
    from megasail.data.preprocess import PreprocessError

    with pytest.raises(PreprocessError, match="max_tiles"):
        plan_run(PreprocessConfig(**{**cfg.__dict__, "resume": True}))


def _tool_parser(script: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), TOOLS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_every_flag_is_documented_and_help_runs():
    from megasail.data.preprocess.cli import build_parser

    assert all(config_help().values())
    for parser in (build_parser(), _tool_parser("inspect_dataset.py"), _tool_parser("bench_preprocess.py")):
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert not undocumented, f"{parser.prog}: flags without a help line: {undocumented}"
    for script in ("preprocess_data.py", "inspect_dataset.py", "bench_preprocess.py"):
        r = run_tool(script, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout, (script, r.stderr)
    r = run_tool("preprocess_data.py", "--help")
    for flag in (
        "--input",
        "--image-root",
        "--tokenizer",
        "--template",
        "--output-prefix",
        "--workers",
        "--max-seq-length",
        "--max-tiles",
        "--on-too-long",
        "--max-image-pixels",
        "--overwrite",
        "--resume",
    ):
        assert flag in r.stdout


# -- units of the pipeline ------------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "TIFF", "BMP"])
def test_convertible_formats_become_lossless_png(fmt):
    from megasail.data.format.codes import ImageFormat
    from megasail.data.preprocess.images import validate_image

    raw = image_bytes(fmt, 33, 17, 5)
    out = validate_image(raw, "x", 10**6)
    assert (out.format, out.width, out.height, out.source_format) == (ImageFormat.PNG, 33, 17, fmt)
    decoded = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"))
    assert np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
    assert validate_image(raw, "x", 10**6).data == out.data  # deterministic re-encode


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    from megasail.data.preprocess.images import validate_image
    from megasail.data.preprocess.rejects import RecordRejected

    for width, height in ((3000, 3000), (100_000, 100_000)):  # under and over Pillow's own bomb limit
        with pytest.raises(RecordRejected) as err:
            validate_image(_png_header_only(width, height), "bomb.png", 1_000_000)
        assert err.value.reason == "image_too_large"


def test_jsonl_units_cover_every_line_once(tmp_path):
    from megasail.data.preprocess.sources import expand_inputs, iter_unit_records, plan_units

    path = tmp_path / "x.jsonl"
    lines = b"".join(b'{"text": "%d"}\n' % i for i in range(10))
    path.write_bytes(
        b"\xef\xbb\xbf" + lines + b"\n" + b'{"text": "last"}'
    )  # BOM; blank line; no final newline
    units = plan_units(expand_inputs([str(path)], "auto"), lines_per_unit=3)
    assert [u.first_line for u in units] == [1, 4, 7, 10]
    records = [r for u in units for r in iter_unit_records(u, 1 << 20)]
    assert [r.fields["text"] for r in records] == [str(i) for i in range(10)] + ["last"]
    assert records[-1].location == f"{path}:12"  # the blank line 11 is skipped but counted
    assert [u.end_byte for u in units][-1] == path.stat().st_size


def test_webdataset_is_streamed_without_touching_the_filesystem(tmp_path, tiny_tokenizer):
    import tarfile

    tar_path = tmp_path / "evil.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (
            ("../../escape.jpg", image_bytes("JPEG")),
            ("../../escape.txt", b"caption"),
            ("/abs/path.png", image_bytes("PNG")),
            ("/abs/path.txt", b"abs"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")}
    cfg = PreprocessConfig(
        inputs=[str(tar_path)], output_prefix=str(work / "ds"), tokenizer=tiny_tokenizer, progress=False
    )
    manifest = run_preprocess(cfg)["manifest"]
    assert manifest["counts"]["written"] == 2 and manifest["counts"]["rejected"] == 0
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(p.parent == work for p in created), created  # only the prefix's own files
    assert not (tmp_path / "escape.jpg").exists()


def test_caption_template_can_be_a_chat_template(tmp_path, tiny_tokenizer):
    write_images(str(tmp_path), {"a.jpg": image_bytes("JPEG")})
    jsonl = write_jsonl(str(tmp_path / "c.jsonl"), [{"image": "a.jpg", "caption": "Noise."}])
    cfg = PreprocessConfig(
        inputs=[jsonl],
        output_prefix=str(tmp_path / "ds"),
        tokenizer=tiny_tokenizer,
        caption_template="internvl2_5",
        system_message="S",
        max_tiles=1,
        progress=False,
    )
    run_preprocess(cfg)
    tok = MultimodalTokenizer.load(tiny_tokenizer)
    sample = IndexedMultimodalDataset(str(tmp_path / "ds")).expand(0, 1)
    text = tok.decode(sample.input_ids.tolist())
    assert text.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<img><IMG_CONTEXT>")
    assert tok.decode(sample.input_ids[sample.loss_mask].tolist()) == "Noise.<|im_end|>"


def test_bench_quick_runs():
    r = run_tool("bench_preprocess.py", "--quick", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "byte-identical: yes" in r.stdout and "| pack_samples |" in r.stdout


def test_progress_increments_add_up_to_the_unit(tmp_path, tiny_tokenizer):
    from megasail.data.preprocess.sources import expand_inputs, plan_units
    from megasail.data.preprocess.worker import UnitContext, process_unit

    jsonl = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": f"doc {i}"} for i in range(40)] + [b"{bad"])
    (unit,) = plan_units(expand_inputs([jsonl], "auto"), lines_per_unit=100)
    calls = []
    ctx = UnitContext(
        PreprocessConfig(tokenizer=tiny_tokenizer), MultimodalTokenizer.load(tiny_tokenizer), str(tmp_path)
    )
    report = process_unit(unit, ctx, lambda records, nbytes: calls.append((records, nbytes)))
    assert len(calls) > 1  # intermediate updates, not only one at the end
    assert sum(c[0] for c in calls) == report["read"] == 41
    assert sum(c[1] for c in calls) == Path(jsonl).stat().st_size


# -- robustness: dead workers, hostile records and paths, caps, early merge errors -----------------


def test_dead_worker_stops_the_run_and_resume_finishes_identically(tmp_path, tiny_tokenizer):
    write_images(str(tmp_path / "imgs"), {f"{k}.jpg": image_bytes("JPEG", 40 + k, 30, k) for k in range(4)})
    jsonl = write_jsonl(
        str(tmp_path / "in.jsonl"), good_conversation_records(24, [f"{k}.jpg" for k in range(4)])
    )
    common = unit_run_args(jsonl, tmp_path / "imgs", tiny_tokenizer)
    ref = tmp_path / "ref" / "ds"
    assert run_tool("preprocess_data.py", *common, "--output-prefix", ref).returncode == 0
    died = tmp_path / "died" / "ds"
    started = time.monotonic()
    result = run_tool(
        "preprocess_data.py",
        *common,
        "--output-prefix",
        died,
        "--workers",
        2,
        env=tool_env(MEGASAIL_PREPROCESS_KILL_UNIT="3"),
        timeout=120,  # before the fix the run never ends
    )
    assert time.monotonic() - started < 60
    assert result.returncode == 3, result.stderr
    assert "worker process died" in result.stderr and "--resume" in result.stderr
    assert "3 (in.jsonl from line 13)" in result.stderr  # the unit that was running is named
    assert not Path(f"{died}.manifest.json").exists()
    resumed = run_tool("preprocess_data.py", *common, "--output-prefix", died, "--resume", "--workers", 2)
    assert resumed.returncode == 0, resumed.stderr
    assert prefix_files(died) == prefix_files(ref)


def test_hostile_records_are_rejected_and_never_end_the_run(tmp_path, tiny_tokenizer, monkeypatch):
    import megasail.data.preprocess.worker as worker_module

    write_images(str(tmp_path), {"a.jpg": image_bytes("JPEG")})
    real_encode = worker_module.encode_sample

    def encode_or_fail(parsed, *args, **kwargs):
        if parsed.conversation.turns[-1].text == "boom":
            raise ZeroDivisionError("a bug in encoding")
        return real_encode(parsed, *args, **kwargs)

    monkeypatch.setattr(worker_module, "encode_sample", encode_or_fail)
    lines = [
        {"text": "good"},
        b"[" * 200_000,  # RecursionError in json
        b"1" * 5000,  # ValueError: integer string too long
        {"image": "a\u0000b.jpg", "caption": "NUL in the name"},
        {"text": "boom"},
        {"image": "a.jpg", "caption": "good too"},
    ]
    jsonl = write_jsonl(str(tmp_path / "in.jsonl"), lines)
    tar = write_webdataset(
        str(tmp_path / "s.tar"),
        [
            {"jpg": image_bytes("JPEG"), "json": b"[" * 200_000},
            {"jpg": image_bytes("JPEG"), "json": b"1" * 5000},
            {"jpg": image_bytes("JPEG"), "txt": b"fine"},
        ],
    )
    prefix = tmp_path / "ds"
    cfg = PreprocessConfig(
        inputs=[jsonl, tar],
        output_prefix=str(prefix),
        tokenizer=tiny_tokenizer,
        max_tiles=1,
        progress=False,
        max_internal_errors=1,
    )
    manifest = run_preprocess(cfg)["manifest"]
    rejects = [json.loads(line) for line in Path(f"{prefix}.rejects.jsonl").read_text().splitlines()]
    assert [(r["location"].rsplit(":", 1)[1], r["reason"]) for r in rejects] == [
        ("2", "malformed_json"),
        ("3", "malformed_json"),
        ("4", "malformed_record"),
        ("000000.jpg", "malformed_json"),
        ("000001.jpg", "malformed_json"),
    ]  # line 5 hit a bug: an internal error, not a reject
    assert manifest["counts"]["internal_errors"] == 1
    assert manifest["counts"]["written"] == 3 and not any(reconcile(manifest).values())


def test_internal_errors_are_reported_apart_and_fail_the_run(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    """A bug inside megasail (planted: encode_sample raises ZeroDivisionError on the record "boom") is not
    bad input: it stays out of the rejects, is written with its traceback to PREFIX.internal_errors.jsonl,
    and fails the run (exit 4, no manifest) unless --max-internal-errors tolerates it. Once the bug is
    fixed, --resume keeps the clean unit, redoes the one that hit the bug, and gives a clean run's bytes.

    Fails if the error is counted as a reject (the old behaviour: the run succeeds), if the traceback is
    lost, if the tolerated count is not enforced or not counted in the manifest, or if --resume keeps the
    unit that hit the bug."""
    import megasail.data.preprocess.worker as worker_module
    from megasail.data.preprocess import cli

    real_encode = worker_module.encode_sample

    def encode_or_fail(parsed, *args, **kwargs):
        if parsed.conversation.turns[-1].text == "boom":
            raise ZeroDivisionError("a bug in encoding")
        return real_encode(parsed, *args, **kwargs)

    jsonl = write_jsonl(
        str(tmp_path / "in.jsonl"), [{"text": "boom" if i == 5 else f"doc {i}"} for i in range(8)]
    )
    common = ["--input", jsonl, "--tokenizer", tiny_tokenizer, "--lines-per-unit", "4", "--no-progress"]
    clean = tmp_path / "clean" / "ds"
    assert cli.main([*common, "--output-prefix", str(clean)]) == 0
    capsys.readouterr()

    monkeypatch.setattr(worker_module, "encode_sample", encode_or_fail)
    prefix = tmp_path / "bug" / "ds"
    assert cli.main([*common, "--output-prefix", str(prefix)]) == 4
    err = capsys.readouterr().err
    assert (
        "1 record(s) raised an unexpected exception inside megasail" in err and "--max-internal-errors" in err
    )
    assert "ZeroDivisionError: a bug in encoding" in err and "in encode_or_fail" in err  # the traceback
    assert not Path(f"{prefix}.manifest.json").exists()
    (entry,) = [json.loads(line) for line in Path(f"{prefix}.internal_errors.jsonl").read_text().splitlines()]
    assert (
        entry["location"].endswith("in.jsonl:6") and entry["error"] == "ZeroDivisionError: a bug in encoding"
    )
    assert 'raise ZeroDivisionError("a bug in encoding")' in entry["traceback"]

    tolerated = tmp_path / "tolerated" / "ds"
    assert cli.main([*common, "--output-prefix", str(tolerated), "--max-internal-errors", "1"]) == 0
    manifest = json.loads(Path(f"{tolerated}.manifest.json").read_text())
    assert manifest["counts"]["internal_errors"] == 1 and manifest["counts"]["rejected"] == 0
    assert manifest["counts"]["written"] == 7 and not any(reconcile(manifest).values())
    assert Path(f"{tolerated}.rejects.jsonl").read_text() == ""
    assert Path(f"{tolerated}.internal_errors.jsonl").exists()

    monkeypatch.setattr(worker_module, "encode_sample", real_encode)  # the bug is fixed
    report = tmp_path / "report.json"
    assert cli.main([*common, "--output-prefix", str(prefix), "--resume", "--report-json", str(report)]) == 0
    assert json.loads(report.read_text())["runtime"]["units_resumed"] == 1  # unit 0 kept, unit 1 redone
    assert prefix_files(prefix) == prefix_files(clean)
    assert not Path(f"{prefix}.internal_errors.jsonl").exists()


def test_image_paths_stay_inside_the_root_and_are_bounded(tmp_path, tiny_tokenizer):
    root = tmp_path / "root"
    write_images(str(root), {"a.jpg": image_bytes("JPEG"), "big.png": image_bytes("PNG", 200, 200)})
    write_images(str(tmp_path / "outside"), {"secret.jpg": image_bytes("JPEG")})
    os.symlink(tmp_path / "outside" / "secret.jpg", root / "link.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    os.mkfifo(root / "fifo.jpg")
    (root / "dir.jpg").mkdir()
    limit = len((root / "big.png").read_bytes()) - 1
    cases = {
        "a.jpg": None,
        str(tmp_path / "outside" / "secret.jpg"): "image_path_outside_root",
        "/dev/zero": "image_path_outside_root",
        "../outside/secret.jpg": "image_path_outside_root",
        "link.jpg": "image_path_outside_root",
        "zero.jpg": "image_path_outside_root",
        "fifo.jpg": "image_unreadable",  # opened non-blocking: no hang
        "dir.jpg": "image_unreadable",
        "big.png": "image_too_large",
    }
    jsonl = write_jsonl(
        str(tmp_path / "in.jsonl"), [{"image": name, "caption": f"case {i}"} for i, name in enumerate(cases)]
    )
    prefix = tmp_path / "ds"
    r = run_tool(
        "preprocess_data.py",
        "--input",
        jsonl,
        "--image-root",
        root,
        "--tokenizer",
        tiny_tokenizer,
        "--output-prefix",
        prefix,
        "--max-image-bytes",
        limit,
        "--no-progress",
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    rejects = [json.loads(line) for line in Path(f"{prefix}.rejects.jsonl").read_text().splitlines()]
    got = {int(x["location"].rsplit(":", 1)[1]): x["reason"] for x in rejects}
    assert got == {i + 1: reason for i, reason in enumerate(cases.values()) if reason}
    manifest = json.loads(Path(f"{prefix}.manifest.json").read_text())
    assert manifest["counts"]["written"] == 1
    assert set(manifest["rejected_by_reason"]) <= set(__import__("megasail").data.preprocess.REJECT_REASONS)


def test_webdataset_reads_only_used_members_under_their_caps(tmp_path, tiny_tokenizer, monkeypatch):
    import tarfile

    import megasail.data.preprocess.sources as sources

    monkeypatch.setattr(sources, "MAX_TEXT_MEMBER_BYTES", 1000)
    read_members = []
    real_extractfile = tarfile.TarFile.extractfile

    def spy(self, member):
        read_members.append(member.name)
        return real_extractfile(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    small, big = image_bytes("JPEG", 32, 32), image_bytes("PNG", 300, 300, 7)
    tar = write_webdataset(
        str(tmp_path / "s.tar"),
        [
            {"jpg": small, "mp4": b"\0" * 100_000, "txt": b"ok"},
            {"png": big, "txt": b"image too large"},
            {"jpg": small, "txt": b"x" * 1001},
            {"jpg": small, "json": b'{"caption": "' + b"y" * 1000 + b'"}'},
            {"jpg": small, "txt": b"ok again"},
        ],
    )
    prefix = tmp_path / "ds"
    cfg = PreprocessConfig(
        inputs=[tar],
        output_prefix=str(prefix),
        tokenizer=tiny_tokenizer,
        max_tiles=1,
        max_image_bytes=len(big) - 1,
        progress=False,
    )
    manifest = run_preprocess(cfg)["manifest"]
    assert manifest["counts"]["written"] == 2
    assert manifest["rejected_by_reason"] == {"member_too_large": 3}
    assert "000000.mp4" not in read_members and "000001.png" not in read_members
    assert "000002.txt" not in read_members


def test_merge_failure_is_raised_at_the_next_feed(tmp_path):
    from megasail.data.preprocess.writer import StreamingMerge

    merge = StreamingMerge(
        str(tmp_path / "out"), [(0, str(tmp_path / "missing-0")), (1, str(tmp_path / "m-1"))]
    )
    try:
        merge.feed({0})
        assert _wait_for(lambda: all(f.done() for f in merge._futures), timeout=30)
        with pytest.raises(Exception):  # noqa: B017  (whatever the merger raises for a missing shard)
            merge.feed({0})
    finally:
        merge.abort()


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "EPS_HEADER"])
def test_only_known_image_formats_are_opened(fmt):
    from megasail.data.preprocess.images import validate_image
    from megasail.data.preprocess.rejects import RecordRejected

    if fmt == "EPS_HEADER":
        raw = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    else:
        raw = image_bytes(fmt, 16, 16)
        assert Image.open(io.BytesIO(raw)).format == fmt  # Pillow itself would open it
    with pytest.raises(RecordRejected) as err:
        validate_image(raw, "x.jpg", 10**6)
    assert err.value.reason == "image_unsupported"


def test_load_report_distrusts_unreadable_reports_and_missing_shards(tmp_path, tiny_tokenizer):
    from megasail.data.preprocess.sources import expand_inputs, plan_units
    from megasail.data.preprocess.worker import (
        UnitContext,
        load_report,
        process_unit,
        report_path,
        unit_prefix,
    )

    jsonl = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": "doc"}])
    (unit,) = plan_units(expand_inputs([jsonl], "auto"), lines_per_unit=100)
    parts = tmp_path / "parts"
    parts.mkdir()
    ctx = UnitContext(
        PreprocessConfig(tokenizer=tiny_tokenizer), MultimodalTokenizer.load(tiny_tokenizer), str(parts)
    )
    report = process_unit(unit, ctx)
    assert load_report(str(parts), unit) == report
    os.remove(unit_prefix(str(parts), unit) + ".img.bin")
    assert load_report(str(parts), unit) is None  # a shard file is gone: redo the unit
    Path(report_path(str(parts), unit)).write_bytes(b"\xff\xfe{")
    assert load_report(str(parts), unit) is None  # not UTF-8
    os.remove(report_path(str(parts), unit))
    os.mkdir(report_path(str(parts), unit))
    assert load_report(str(parts), unit) is None  # IsADirectoryError


def test_resume_of_a_finished_prefix_checks_its_settings(tmp_path, tiny_tokenizer):
    from megasail.data.preprocess import PreprocessError

    jsonl = write_jsonl(str(tmp_path / "in.jsonl"), [{"text": "hello"}])
    cfg = PreprocessConfig(
        inputs=[jsonl], output_prefix=str(tmp_path / "ds"), tokenizer=tiny_tokenizer, progress=False
    )
    first = run_preprocess(cfg)["manifest"]
    again = run_preprocess(PreprocessConfig(**{**cfg.__dict__, "resume": True}))
    assert again["manifest"] == first and again["runtime"]["units_resumed"] == 1
    with pytest.raises(PreprocessError, match="max_seq_length.*--overwrite"):
        run_preprocess(PreprocessConfig(**{**cfg.__dict__, "resume": True, "max_seq_length": 77}))
    manifest_path = tmp_path / "ds.manifest.json"
    legacy = {k: v for k, v in json.loads(manifest_path.read_text()).items() if k != "fingerprint"}
    manifest_path.write_text(json.dumps(legacy))
    with pytest.raises(PreprocessError, match="no settings fingerprint"):
        run_preprocess(PreprocessConfig(**{**cfg.__dict__, "resume": True}))
