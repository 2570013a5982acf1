"""Generation (megasail.inference) and tools/chat.py against transformers' generate on a tiny InternVL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from chat_utils import chatty_hf_model, png_bytes, save_chat_dir
from dist_utils import run_distributed_test

NEW = 24


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("chat")
    hf = chatty_hf_model()
    save_chat_dir(hf, directory)
    (directory / "wide.png").write_bytes(png_bytes(120, 60, seed=1))  # 2x1 grid + thumbnail = 3 tiles
    (directory / "square.png").write_bytes(png_bytes(40, 40, seed=2))  # 1 tile
    return directory, hf


@pytest.fixture(scope="module")
def chat(chat_dir):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import chat as chat_tool

    from megasail import runtime

    directory, _ = chat_dir
    runtime.initialize(1, 1)
    yield chat_tool.Chat(
        chat_tool.parse_args(["--load", str(directory), "--prompt", "x", "--max-new-tokens", str(NEW)])
    )
    runtime.destroy()


def _hf_greedy(hf, request, stop, new=NEW):
    images = {} if request.pixel_values is None else {"pixel_values": request.pixel_values}
    out = hf.generate(
        input_ids=torch.tensor([request.input_ids]),
        **images,
        do_sample=False,
        max_new_tokens=new,
        eos_token_id=list(stop),
        pad_token_id=0,
    )
    return out[0, len(request.input_ids) :].tolist()


def test_greedy_equals_transformers_generate(chat_dir, chat):
    """Fails if the KV cache is not advanced between steps, the image embeddings are not spliced at
    <IMG_CONTEXT>, the tiles or the template differ from what the prompt's tokens say, or the
    cache keeps the prompt's causal mask in decode steps."""
    directory, hf = chat_dir
    for images in ([], ["wide.png"], ["wide.png", "square.png"]):
        request = chat.request("Describe it.", [(directory / name).read_bytes() for name in images])
        expected = _hf_greedy(hf, request, chat.params.stop_token_ids)
        assert len(set(expected)) > 3  # the oracle answer is not one repeated token
        got = chat.answer([request])[0].token_ids
        assert got == expected, images


def test_batch_with_padding_equals_single_prompts(chat_dir, chat):
    """Fails if left padding is attended to (pad keys not masked) or rows of a batch mix."""
    directory, _ = chat_dir
    requests = [
        chat.request("Hi", [(directory / "wide.png").read_bytes()]),
        chat.request("A much longer question about nothing at all?", []),
        chat.request("What?", [(directory / "square.png").read_bytes()]),
    ]
    assert len({len(r.input_ids) for r in requests}) == 3
    singles = [chat.answer([r])[0].token_ids for r in requests]
    batched = [r.token_ids for r in chat.answer(requests)]
    uncached = [r.token_ids for r in chat.answer(requests, use_cache=False)]
    assert batched == singles
    assert uncached == singles


def test_sampling_is_seeded(chat):
    """Fails if the seed is ignored, or if top_p does not cut the tail (tiny top_p must be greedy)."""
    from dataclasses import replace

    request = chat.request("Tell me a story.", [])
    sampled = replace(chat.params, greedy=False, temperature=1.5, top_p=0.95, seed=3)
    a = chat.answer([request], sampled)[0].token_ids
    assert chat.answer([request], sampled)[0].token_ids == a
    assert chat.answer([request], replace(sampled, seed=4))[0].token_ids != a
    greedy = chat.answer([request])[0].token_ids
    assert chat.answer([request], replace(sampled, top_p=1e-6))[0].token_ids == greedy
    assert a != greedy


def _tool(*args, timeout=120, stdin=None):
    """Run tools/chat.py as a single process (the rendezvous of this test process is not inherited)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")
    }
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, os.path.join(repo, "tools", "chat.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=stdin,
    )


def test_chat_tool_prompt_and_batch_jsonl(chat_dir, chat, tmp_path):
    """Fails if the tool prints anything besides the answer, drops or reorders batch lines, hides a
    bad line, or answers differently in a batch than transformers does one prompt at a time. Faults
    caught: an error row without the input's "id" (or, for a line that is no JSON, its index);
    "line" counting non-empty lines instead of the file's lines; image paths resolved against the
    working directory instead of the JSONL's (the tool runs elsewhere; --help says which)."""
    helptext = _tool("--help").stdout
    assert "relative to the directory of the JSONL file" in " ".join(helptext.split())
    directory, hf = chat_dir
    proc = _tool(
        "--load",
        str(directory),
        "--image",
        str(directory / "wide.png"),
        "--prompt",
        "Describe it.",
        "--max-new-tokens",
        str(NEW),
        "--greedy",
    )
    assert proc.returncode == 0, proc.stderr
    request = chat.request("Describe it.", [(directory / "wide.png").read_bytes()])
    expected = _hf_greedy(hf, request, chat.params.stop_token_ids)
    stop = set(chat.params.stop_token_ids)
    assert proc.stdout == chat.tokenizer.decode([t for t in expected if t not in stop]) + "\n"
    assert "tokens/s" in proc.stderr

    lines = [
        {"id": "a", "prompt": "Describe it.", "images": ["wide.png"]},
        {"id": "b", "question": "Why?"},
        {"id": "c", "images": ["square.png"]},  # no prompt: reported, not dropped
        {"id": "d", "prompt": "What?", "images": ["square.png"]},
    ]
    text = [json.dumps(x) + "\n" for x in lines]
    text.insert(2, "\n")  # a blank line is skipped; "line" stays the file's line number
    (directory / "in.jsonl").write_text("".join(text) + '{"id": "e", "prompt": \n')  # not JSON
    out = tmp_path / "out.jsonl"
    proc = _tool(
        "--load",
        str(directory),
        "--batch-jsonl",
        str(directory / "in.jsonl"),
        "--output",
        str(out),
        "--max-new-tokens",
        str(NEW),
        "--batch-size",
        "2",
    )
    assert proc.returncode == 1, proc.stderr  # bad lines
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r.get("id") for r in records] == ["a", "b", "c", "d", 4]  # a line without JSON: its index
    assert ["error" in r for r in records] == [False, False, True, False, True]
    assert "error" in records[2] and records[2]["line"] == 4
    assert "error" in records[4] and records[4]["line"] == 6
    for record, item in zip(records, lines, strict=False):
        if "error" in record:
            continue
        images = [(directory / p).read_bytes() for p in item.get("images", [])]
        req = chat.request(item.get("prompt", item.get("question")), images)
        assert record["token_ids"] == _hf_greedy(hf, req, chat.params.stop_token_ids), item["id"]


def test_chat_tool_bench_and_interactive(chat_dir):
    """Fails if --bench does not time both paths, or --interactive forgets earlier turns."""
    directory, _ = chat_dir
    proc = _tool("--load", str(directory), "--prompt", "Hi", "--bench")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("bench:") and "KV cache" in proc.stdout and "no cache" in proc.stdout
    run = _tool(
        "--load",
        str(directory),
        "--interactive",
        "--max-new-tokens",
        "8",
        stdin="Hi\nAnd then?\n/reset\nAnd then?\n",
    )
    assert run.returncode == 0, run.stderr
    answers = run.stdout.split("\n")
    # "And then?" after "Hi" sees the first turn; after /reset it is a fresh conversation
    assert "tokens/s" in run.stderr
    assert run.stderr.count("new tokens") == 3
    prompts = [line for line in run.stderr.splitlines() if "prompt tokens" in line]
    second, third = (int(p.split(" prompt tokens")[0].rsplit(" ", 1)[1]) for p in prompts[1:])
    assert second > third, answers


def _parallel_generation(rank, world_size, directory, tp, pp, expected_by_prompt):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import chat as chat_tool

    from megasail import runtime

    runtime.initialize(tp, pp)
    chat = chat_tool.Chat(
        chat_tool.parse_args(["--load", directory, "--prompt", "x", "--max-new-tokens", str(NEW)])
    )
    items = list(expected_by_prompt.items())
    requests = [
        chat.request(q, [open(os.path.join(directory, p), "rb").read() for p in images])
        for (q, images), _ in items
    ]
    assert [r.token_ids for r in chat.answer(requests)] == [tokens for _, tokens in items]


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_generation_equals_transformers(chat_dir, chat, tp, pp):
    """Fails if TP ranks sample from their vocabulary shard only, or a pipeline stage does not pass
    its hidden states on / the sampled tokens back."""
    directory, hf = chat_dir
    expected = {}
    for q, images in (("Describe it.", ("wide.png",)), ("Why?", ())):
        request = chat.request(q, [(directory / p).read_bytes() for p in images])
        expected[(q, images)] = _hf_greedy(hf, request, chat.params.stop_token_ids)
    run_distributed_test(_parallel_generation, tp * pp, str(directory), tp, pp, expected)


def test_chat_loads_a_megasail_checkpoint(chat_dir, chat, tmp_path):
    """A checkpoint written by tools/convert_checkpoint.py answers exactly as transformers does. Fails if
    chat.py builds the model from the wrong config or loads the weights at the wrong keys."""
    from megasail.inference.loading import is_hf_directory

    directory, hf = chat_dir
    env = {
        k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")
    }
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run(
        [sys.executable, os.path.join(repo, "tools", "convert_checkpoint.py"), "--from", "hf", "--to", "megasail",
         "--input", str(directory), "--output", str(ckpt)],
        capture_output=True, text=True, timeout=300, env=dict(env, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not is_hf_directory(str(ckpt))
    sys.path.insert(0, os.path.join(repo, "tools"))
    import chat as chat_tool

    args = ["--load", str(ckpt), "--prompt", "x"]  # tokenizer and max tiles came with the conversion
    from_checkpoint = chat_tool.Chat(chat_tool.parse_args(args + ["--max-new-tokens", str(NEW)]))
    request = from_checkpoint.request("Describe it.", [(directory / "wide.png").read_bytes()])
    assert (
        request.input_ids == chat.request("Describe it.", [(directory / "wide.png").read_bytes()]).input_ids
    )
    expected = _hf_greedy(hf, request, chat.params.stop_token_ids)
    assert from_checkpoint.answer([request])[0].token_ids == expected
