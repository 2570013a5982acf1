"""Helpers for the HuggingFace export tests: loading an export's processor as transformers does,
images as transformers takes them, megasail prompts built by tools/chat.py's own Chat class."""

from __future__ import annotations

import io
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a build for another torch (fails on import)
        return False
    return True


def load_processor(export, monkeypatch):
    """``AutoProcessor.from_pretrained(export)`` with PIL's resize, as docs/checkpoints.md advises.

    transformers builds InternVLProcessor's video processor only with torchvision installed (and
    then resizes images with torchvision unless given a PIL image processor). Without torchvision
    the processor is built without its video processor (an export holds no video settings): the
    image processor, tokenizer, chat template and processor_config.json load as AutoProcessor
    loads them."""
    from transformers import AutoImageProcessor, AutoProcessor, InternVLProcessor

    if torchvision_works():
        pil = AutoImageProcessor.from_pretrained(str(export), backend="pil")
        return AutoProcessor.from_pretrained(str(export), image_processor=pil)
    monkeypatch.setattr(
        InternVLProcessor, "get_attributes", classmethod(lambda cls: ["image_processor", "tokenizer"])
    )
    return AutoProcessor.from_pretrained(str(export))


def pil_image(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def user_message(question: str, images: list) -> list[dict]:
    """transformers' chat messages for one user turn: the images, then the question."""
    content = [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


def megasail_chat(load: str, *extra: str):
    """tools/chat.py's Chat on ``load`` (call between runtime.initialize(1, 1) and runtime.destroy())."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import chat as chat_tool

    return chat_tool.Chat(chat_tool.parse_args(["--load", str(load), "--prompt", "x", *extra]))


def run_tool(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """tools/NAME as a command in a clean environment (nothing of this process's rendezvous)."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH", "HF_HUB_OFFLINE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
