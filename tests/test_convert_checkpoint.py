"""tools/convert_checkpoint.py: HF InternVL <-> megasail torch_dist, streamed, in both key layouts.

The oracle is transformers itself (its own InternVLForConditionalGeneration, save_pretrained and
from_pretrained); megasail's side is loaded with the checkpoint module's load_checkpoint at
TP=1, TP=2 and PP=2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from dist_utils import run_distributed_test
from model_utils import multimodal_batch, tiny_hf_model, tiny_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELECT = -4  # ViT layers after select_layer are not converted


def convert(*args):
    # a clean environment: variables set by earlier in-process tests (rendezvous, allocator, threads)
    # must not change what the tool does or how much memory it takes
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH", "OPENBLAS_CORETYPE",
            "OPENBLAS_L2_SIZE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), *args],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def convert_here(*args):
    """The tool's main() in this process (the subprocess runs above cover the command line itself)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint

    assert convert_checkpoint.main(list(args)) == 0


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model(SELECT)  # GQA (4 heads, 2 kv groups), untied lm_head, 5-layer ViT cut after 2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, hf_model):
    root = tmp_path_factory.mktemp("convert")
    hf_model.save_pretrained(root / "hf", safe_serialization=True, max_shard_size="60KB")
    assert len(list((root / "hf").glob("*.safetensors"))) > 3  # sharded, with an index
    convert("--from", "hf", "--to", "megasail", "--input", str(root / "hf"), "--output", str(root / "ms"))
    convert(
        "--from",
        "megasail",
        "--to",
        "hf",
        "--input",
        str(root / "ms"),
        "--output",
        str(root / "export"),
        "--max-shard-size",
        "100KB",
    )
    return root


def _batch():
    cfg = tiny_model_config(SELECT)
    return multimodal_batch(cfg, tiles_per_image=(1, 3))


def test_converted_checkpoint_loads_and_matches_transformers(dirs, hf_model):
    """Fails if q/k/v are fused in the wrong group order, gate/up swapped, a norm lands under the wrong
    TE key, or the config YAML loses a parity value (eps, rope theta, select layer)."""
    from megasail import runtime
    from megasail.config import load_config
    from megasail.models.sail_vl import SailVLModel
    from megasail.training.checkpoint import load_checkpoint, read_meta

    cfg = load_config(str(dirs / "ms" / "config.yaml")).model
    assert cfg == tiny_model_config(SELECT)
    meta = read_meta(str(dirs / "ms"))
    assert meta["iteration"] == 0 and meta["weights_only"]
    runtime.initialize(1, 1)
    try:
        model = SailVLModel(cfg).eval()
        load_checkpoint(str(dirs / "ms"), [model], weights_only=True)
        ids, positions, pixels = _batch()
        with torch.no_grad():
            diff = (
                (model(ids, positions, pixels) - hf_model(input_ids=ids, pixel_values=pixels).logits)
                .abs()
                .max()
            )
    finally:
        runtime.destroy()
    assert diff < 1e-4


def _parallel_logits(rank, world_size, ckpt, tp, pp, expected_path):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megasail.config import ParallelConfig
    from megasail.runtime import initialize
    from megasail.training import build_model_chunks
    from megasail.training.checkpoint import load_checkpoint

    initialize(tp, pp)
    cfg = tiny_model_config(SELECT)
    (model,) = build_model_chunks(cfg, ParallelConfig(tensor=tp, pipeline=pp))
    model.eval()
    load_checkpoint(ckpt, [model], weights_only=True)
    ids, positions, pixels = _batch()
    with torch.no_grad():
        if pp == 1:
            logits = model(ids, positions, pixels)
            parts = [torch.empty_like(logits) for _ in range(tp)]
            dist.all_gather(
                parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
            )
            logits = torch.cat(parts, dim=-1)
        elif rank == 0:
            dist.send(model(ids, positions, pixels).contiguous(), 1)
            return
        else:
            hidden = torch.empty(ids.shape[1], ids.shape[0], cfg.language.hidden_size)
            dist.recv(hidden, 0)
            model.set_input_tensor(hidden)
            logits = model(ids, positions, None)
    diff = (logits - torch.load(expected_path)).abs().max()
    assert diff < 1e-4, diff


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_converted_checkpoint_loads_at_tp2_and_pp2(dirs, hf_model, tmp_path, tp, pp):
    """Fails if the written checkpoint does not reshard: a tensor saved pre-split, a SwiGLU fc1 written
    as one block instead of megatron's gate/up chunks, or layer numbers that are not global."""
    ids, _, pixels = _batch()
    with torch.no_grad():
        torch.save(hf_model(input_ids=ids, pixel_values=pixels).logits, tmp_path / "expected.pt")
    run_distributed_test(_parallel_logits, tp * pp, str(dirs / "ms"), tp, pp, str(tmp_path / "expected.pt"))


def _kept(state: dict) -> dict:
    used = tiny_model_config(SELECT).vision.num_layers_used
    return {
        k: v
        for k, v in state.items()
        if not ((m := re.search(r"vision_tower\.encoder\.layer\.(\d+)\.", k)) and int(m[1]) >= used)
    }


def test_export_is_bitwise_and_loads_in_transformers(dirs, hf_model):
    """Fails if an exported tensor differs in any bit (dtype change, q/k/v split wrong), a key is renamed
    or missing, or config.json does not describe the exported ViT depth."""
    from transformers import AutoModelForImageTextToText

    from megasail.convert.safetensors_io import index_directory, read_tensor

    export = dirs / "export"
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    on_disk = {k: read_tensor(e) for k, e in index_directory(str(export)).items()}
    saved = {k: read_tensor(e) for k, e in index_directory(str(dirs / "hf")).items()}
    expected = {
        k: v
        for k, v in saved.items()
        if not ((m := re.search(r"vision_tower\.encoder\.layer\.(\d+)\.", k)) and int(m[1]) >= 2)
    }
    assert set(on_disk) == set(expected)
    for key, value in expected.items():
        assert on_disk[key].dtype == value.dtype and torch.equal(on_disk[key], value), key
    loaded = AutoModelForImageTextToText.from_pretrained(str(export)).eval()
    assert set(loaded.state_dict()) == set(_kept(hf_model.state_dict()))
    ids, _, pixels = _batch()
    with torch.no_grad():
        diff = (
            loaded(input_ids=ids, pixel_values=pixels).logits
            - hf_model(input_ids=ids, pixel_values=pixels).logits
        )
    assert diff.abs().max() < 1e-5
    assert json.loads((export / "generation_config.json").read_text())["do_sample"] is False


def test_remote_code_layout_round_trips(dirs, hf_model, tmp_path):
    """megasail -> remote-code HF equals transformers' tensors renamed by the parity tests' own table,
    and -> megasail again gives the same tensors bit for bit. Fails if the ViT's fused attn.qkv is not
    [q; k; v], or mlp1's indices (0, 1, 3) are shifted."""
    from test_hf_parity import _transformers_to_remote_code  # the test-side renaming: an independent oracle

    from megasail.convert.dist import DistSource
    from megasail.convert.safetensors_io import index_directory, read_tensor
    from megasail.training.checkpoint import latest_checkpoint

    remote, back = tmp_path / "remote", tmp_path / "back"
    convert_here(
        *"--from megasail --to hf --layout remote-code --input".split(),
        str(dirs / "ms"),
        "--output",
        str(remote),
    )
    cfg = json.loads((remote / "config.json").read_text())
    assert cfg["model_type"] == "internvl_chat" and "auto_map" not in cfg
    expected = _transformers_to_remote_code(_kept(hf_model.state_dict()))
    written = {k: read_tensor(e) for k, e in index_directory(str(remote)).items()}
    assert set(written) == set(expected)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    relayout = tmp_path / "relayout"  # HF -> HF: the transformers directory straight to remote-code names
    convert_here(
        *"--from hf --to hf --layout remote-code --input".split(), str(dirs / "hf"), "--output", str(relayout)
    )
    again = {k: read_tensor(e) for k, e in index_directory(str(relayout)).items()}
    assert set(again) == set(expected) and all(torch.equal(again[k], expected[k]) for k in expected)
    convert_here(*"--from hf --to megasail --input".split(), str(remote), "--output", str(back))
    a = DistSource(latest_checkpoint(str(dirs / "ms")))
    b = DistSource(latest_checkpoint(str(back)))
    assert set(a.tensors) == set(b.tensors)
    for key in a.tensors:
        assert torch.equal(a.read(key), b.read(key)), key


def sail_vl_2b_remote_keys() -> dict[str, tuple[int, ...]]:
    """SAIL-VL-2B's remote-code tensors, written out from its architecture (InternViT-300M-448px with
    24 layers, mlp1 projector, Qwen2.5-1.5B with 28 layers and an untied lm_head)."""
    vit, ffn, llm, kv, mlp, vocab = 1024, 4096, 1536, 256, 8960, 151936
    keys = {
        "vision_model.embeddings.class_embedding": (1, 1, vit),
        "vision_model.embeddings.position_embedding": (1, 1025, vit),
        "vision_model.embeddings.patch_embedding.weight": (vit, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": (vit,),
        "mlp1.0.weight": (4 * vit,), "mlp1.0.bias": (4 * vit,),
        "mlp1.1.weight": (llm, 4 * vit), "mlp1.1.bias": (llm,),
        "mlp1.3.weight": (llm, llm), "mlp1.3.bias": (llm,),
        "language_model.model.embed_tokens.weight": (vocab, llm),
        "language_model.model.norm.weight": (llm,),
        "language_model.lm_head.weight": (vocab, llm),
    }  # fmt: skip
    for i in range(24):
        p = f"vision_model.encoder.layers.{i}."
        keys.update({p + "attn.qkv.weight": (3 * vit, vit), p + "attn.qkv.bias": (3 * vit,),
                     p + "attn.proj.weight": (vit, vit), p + "attn.proj.bias": (vit,),
                     p + "mlp.fc1.weight": (ffn, vit), p + "mlp.fc1.bias": (ffn,),
                     p + "mlp.fc2.weight": (vit, ffn), p + "mlp.fc2.bias": (vit,),
                     p + "norm1.weight": (vit,), p + "norm1.bias": (vit,), p + "norm2.weight": (vit,),
                     p + "norm2.bias": (vit,), p + "ls1": (vit,), p + "ls2": (vit,)})  # fmt: skip
    for i in range(28):
        p = f"language_model.model.layers.{i}."
        keys.update({p + "self_attn.q_proj.weight": (llm, llm), p + "self_attn.q_proj.bias": (llm,),
                     p + "self_attn.k_proj.weight": (kv, llm), p + "self_attn.k_proj.bias": (kv,),
                     p + "self_attn.v_proj.weight": (kv, llm), p + "self_attn.v_proj.bias": (kv,),
                     p + "self_attn.o_proj.weight": (llm, llm), p + "mlp.gate_proj.weight": (mlp, llm),
                     p + "mlp.up_proj.weight": (mlp, llm), p + "mlp.down_proj.weight": (llm, mlp),
                     p + "input_layernorm.weight": (llm,), p + "post_attention_layernorm.weight": (llm,)})  # fmt: skip
    return keys


def test_sail_vl_2b_remote_code_keys_round_trip():
    """The remote-code names written for the SAIL-VL-2B preset are SAIL-VL-2B's, key for key and shape
    for shape, and reading them back resolves every megasail tensor. Fails if a rename is off by one
    (mlp1.2 for mlp1.3), a layer is skipped, or the lm_head is dropped."""
    from megasail import runtime
    from megasail.convert.dist import checkpoint_names, meta_model
    from megasail.convert.hf_dir import HFSource
    from megasail.convert.recipes import hf_file_plan
    from megasail.convert.safetensors_io import TensorEntry
    from megasail.models.presets import sail_vl_2b

    config = sail_vl_2b()
    config.transformer_impl = "local"
    runtime.initialize(1, 1)
    try:
        _, shapes, _ = checkpoint_names(meta_model(config))
    finally:
        runtime.destroy()
    written = dict(hf_file_plan(config, shapes, "remote-code"))
    expected = sail_vl_2b_remote_keys()
    assert set(written) == set(expected), set(written) ^ set(expected)
    assert all(written[k] == expected[k] for k in expected)
    source = HFSource.__new__(HFSource)  # the key check of a directory holding exactly these tensors
    source.directory, source.config, source.layout = "SAIL-VL-2B", config, "remote-code"
    source.entries = {k: TensorEntry("x", torch.bfloat16, s, 0, 0) for k, s in expected.items()}
    from megasail.convert.recipes import recipes

    source.recipes = recipes(config)
    source._check_keys(set(expected))
    assert {r.megasail for r in source.recipes} == set(shapes)


def test_bad_inputs_stop_with_the_tensor_name(dirs, tmp_path):
    """Fails if an unknown key, a wrong shape or pickled weights pass silently (or with a vague error)."""
    bad = tmp_path / "renamed"
    shutil.copytree(dirs / "hf", bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    # rename one tensor in its file and the index
    key = "language_model.model.norm.weight"
    from megasail.convert.safetensors_io import index_directory, plan_shards, read_tensor, write_sharded

    entries = index_directory(str(bad))
    file = entries[key].file
    tensors = {
        ("language_model.model.normm.weight" if k == key else k): read_tensor(e)
        for k, e in entries.items()
        if e.file == file
    }
    os.remove(file)
    sub = tmp_path / "one"
    write_sharded(
        str(sub),
        plan_shards([(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], 1 << 40),
        tensors.__getitem__,
    )
    shutil.move(sub / "model.safetensors", file)
    index["weight_map"] = {
        ("language_model.model.normm.weight" if k == key else k): v for k, v in index["weight_map"].items()
    }
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError) as error:
        convert_here(
            "--from", "hf", "--to", "megasail", "--input", str(bad), "--output", str(tmp_path / "o1")
        )
    assert "unknown tensor 'language_model.model.normm.weight'" in str(error.value)
    assert "closest known: 'language_model.model.norm.weight'" in str(error.value)

    wrong = tmp_path / "wrong_shape"
    shutil.copytree(dirs / "hf", wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 80
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as error:
        convert_here(
            "--from", "hf", "--to", "megasail", "--input", str(wrong), "--output", str(tmp_path / "o2")
        )
    assert "tensor 'language_model.model.layers.0.mlp.down_proj.weight' has shape (64, 96)" in str(
        error.value
    )
    assert "the config needs (64, 80)" in str(error.value)
    assert not (tmp_path / "o2").exists()  # checked from the headers, before anything is written

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(dirs / "hf" / "config.json", pickled)
    torch.save(
        {k: read_tensor(e) for k, e in index_directory(str(dirs / "hf")).items()},
        pickled / "pytorch_model.bin",
    )
    with pytest.raises(ValueError, match="--allow-pickle"):
        convert_here(
            "--from", "hf", "--to", "megasail", "--input", str(pickled), "--output", str(tmp_path / "o3")
        )
    convert_here(
        "--from",
        "hf",
        "--to",
        "megasail",
        "--input",
        str(pickled),
        "--output",
        str(tmp_path / "o4"),
        "--allow-pickle",
    )
    assert (tmp_path / "o4" / "iter_0000000" / "megasail.json").is_file()


def _train(rank, world_size, overrides):
    from train_utils import tiny_run_config

    from megasail.training.loop import pretrain

    pretrain(tiny_run_config(overrides))


@pytest.mark.distributed
def test_checkpoint_trained_at_tp2_exports_to_transformers(tmp_path):
    """pretrain_vlm's own checkpoint (TP=2, after optimizer steps, optimizer state included) exports to
    a directory transformers loads, whose logits equal megasail's on the same batch. Fails if a
    tensor saved in TP chunks is assembled in the wrong order, or optimizer keys leak into the export."""
    from train_utils import make_dataset
    from transformers import AutoModelForImageTextToText

    from megasail import runtime
    from megasail.config import load_config
    from megasail.models.sail_vl import SailVLModel
    from megasail.training.checkpoint import load_checkpoint, read_meta

    prefix = make_dataset(str(tmp_path / "data"), "a", 16, seed=3)
    ckpt, export = tmp_path / "ckpt", tmp_path / "export"
    run_distributed_test(
        _train, 2, ["train.iters=2", f"data.path={prefix}", "parallel.tensor=2", f"checkpoint.save={ckpt}"]
    )
    meta = read_meta(str(ckpt))
    assert meta["layout"]["tp"] == 2 and not meta["weights_only"]
    convert_here(*"--from megasail --to hf --input".split(), str(ckpt), "--output", str(export))
    assert (export / "tokenizer.json").is_file()  # from the dataset manifest
    (yaml := tmp_path / "run.yaml").write_text(meta["config"])
    cfg = load_config(str(yaml), ["model.transformer_impl=local"]).model
    ids, positions, pixels = multimodal_batch(
        cfg, tiles_per_image=(1,), seq_length=cfg.tokens_per_tile + 40, batch=1
    )
    runtime.initialize(1, 1)
    try:
        model = SailVLModel(cfg).eval()
        load_checkpoint(str(ckpt), [model], weights_only=True)
        with torch.no_grad():
            expected = model(ids, positions, pixels)
    finally:
        runtime.destroy()
    hf = AutoModelForImageTextToText.from_pretrained(str(export)).eval()
    with torch.no_grad():
        logits = hf(input_ids=ids, pixel_values=pixels).logits
    assert (logits - expected).abs().max() < 1e-4


def _rss_above_baseline(stderr: str) -> float:
    m = re.search(r"peak RSS \d+ MB: (\d+) MB above", stderr)
    assert m, stderr[-2000:]
    return float(m[1])


@pytest.mark.slow
def test_peak_memory_stays_near_one_shard(tmp_path):
    """A ~300 MB model (bf16, 100 MB shards) converts both ways with peak RSS above the libraries'
    well under the model's size. Fails if a direction holds the whole model (DCP's writer keeping
    every written tensor, DCP's reader staging bytes + tensor + target, a mapped shard)."""
    from model_utils import tiny_hf_config
    from transformers import InternVLForConditionalGeneration

    config = tiny_hf_config(-1, vision_layers=4, language_layers=8)
    config.vision_config.hidden_size, config.vision_config.intermediate_size = 256, 1024
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = (
        1024,
        2816,
        16,
        4,
    )
    text.vocab_size, config.image_token_id = 32000, 31999
    InternVLForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(
        tmp_path / "hf", max_shard_size="100MB"
    )
    largest_mb = max(p.stat().st_size for p in (tmp_path / "hf").glob("*.safetensors")) / (1 << 20)
    total_mb = sum(p.stat().st_size for p in (tmp_path / "hf").glob("*.safetensors")) / (1 << 20)
    assert total_mb > 250 and largest_mb < total_mb / 2  # several shards
    to_ms = convert(
        *"--from hf --to megasail --input".split(), str(tmp_path / "hf"), "--output", str(tmp_path / "ms")
    )
    to_hf = convert(*"--from megasail --to hf --max-shard-size 100MB --input".split(), str(tmp_path / "ms"),
                    "--output", str(tmp_path / "back"))  # fmt: skip
    # Alone, both directions peak at 0.75-0.8x the largest shard; after other tests in one pytest run
    # HF -> megasail has reached 2.5x (allocator state varies), so the bound held here is the one that
    # always separates streaming from holding the model: under 90% of the whole model.
    for proc in (to_ms, to_hf):
        assert _rss_above_baseline(proc.stderr) < 0.9 * total_mb, proc.stderr[-500:]


def test_hf_directory_without_config_json_is_a_one_line_error(dirs, tmp_path):
    """A HuggingFace directory holding weights but no config.json stops both tools with one 'error:'
    line naming DIR/config.json, a non-zero exit status and no traceback. Faults caught: the
    converter opening config.json unchecked (a 20-line FileNotFoundError traceback), chat.py taking
    the directory for a megasail checkpoint ('no checkpoint under DIR' in a traceback)."""
    weights_only = tmp_path / "weights_only"
    shutil.copytree(dirs / "hf", weights_only)
    (weights_only / "config.json").unlink()
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["OMP_NUM_THREADS"] = "1"
    commands = {
        "convert_checkpoint.py": ["--from", "hf", "--to", "megasail", "--input", str(weights_only),
                                  "--output", str(tmp_path / "out")],
        "chat.py": ["--load", str(weights_only), "--prompt", "Hi"],
    }  # fmt: skip
    for tool, args in commands.items():
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, "tools", tool), *args],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert proc.returncode != 0, tool
        assert "Traceback" not in proc.stderr, (tool, proc.stderr[-3000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{weights_only / 'config.json'} not found" in errors[0], (tool, proc.stderr)
        assert ".safetensors" in errors[0]  # what the directory does hold
    assert not (tmp_path / "out").exists()
