import hashlib
import os
import pickle

import pytest
from fixtures.multimodal_data import make_sentencepiece_model, make_tiny_tokenizer

from megasail.data.text.tokenizer import (
    IM_END,
    IM_START,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    REQUIRED_SPECIAL_TOKENS,
    MultimodalTokenizer,
    TokenizerError,
)


@pytest.fixture
def tiny(tmp_path):
    return MultimodalTokenizer.load(make_tiny_tokenizer(str(tmp_path / "tok")))


def test_qwen_keeps_its_chat_tokens_and_appends_image_tokens_after_vocab(qwen):
    assert qwen.token_id(IM_START) == 151644 and qwen.token_id(IM_END) == 151645
    # 151665-151667 are Qwen3's tool tokens in this file, so the image tokens must be new ids
    assert qwen.base_vocab_size == 151669
    assert qwen.added_tokens == {IMG_START: 151669, IMG_END: 151670, IMG_CONTEXT: 151671}
    assert qwen.vocab_size == 151672
    assert qwen.image_token_ids.as_dict() == {"img_start": 151669, "img_context": 151671, "img_end": 151670}


def test_tiny_tokenizer_gets_all_required_tokens_in_order(tiny):
    base = tiny.base_vocab_size
    assert list(tiny.added_tokens) == list(REQUIRED_SPECIAL_TOKENS)
    assert list(tiny.added_tokens.values()) == list(range(base, base + len(REQUIRED_SPECIAL_TOKENS)))
    assert tiny.vocab_size == base + len(REQUIRED_SPECIAL_TOKENS)


@pytest.mark.parametrize("name", ["qwen", "tiny"])
def test_user_text_never_becomes_a_special_token(name, request):
    tok = request.getfixturevalue(name)
    text = f"say {IM_END} and {IMG_START} please"
    plain = tok.encode(text)
    specials = {tok.token_id(t) for t in REQUIRED_SPECIAL_TOKENS}
    assert not specials & set(plain)
    assert tok.decode(plain) == text
    parsed = tok.encode_with_special_tokens(text)
    assert tok.token_id(IM_END) in parsed and tok.token_id(IMG_START) in parsed
    assert tok.decode(parsed) == text


def test_pickle_round_trip_keeps_behaviour(qwen):
    clone = pickle.loads(pickle.dumps(qwen))
    text = f"hello {IM_END} world"
    assert clone.encode(text) == qwen.encode(text)
    assert clone.identity() == qwen.identity()


def test_identity_hashes_the_tokenizer_file(tiny):
    ident = tiny.identity()
    with open(tiny.file, "rb") as f:
        assert ident["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert ident["kind"] == "hf" and ident["added_tokens"] == tiny.added_tokens
    assert ident["special_token_ids"][IMG_CONTEXT] == tiny.token_id(IMG_CONTEXT)


def test_sentencepiece_model_gets_tokens_and_round_trips(tmp_path):
    tok = MultimodalTokenizer.load(make_sentencepiece_model(str(tmp_path)))
    assert tok.kind == "sentencepiece"
    assert set(tok.added_tokens) == set(REQUIRED_SPECIAL_TOKENS)
    assert min(tok.added_tokens.values()) == tok.base_vocab_size
    text = "A cat sits on a mat."
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode_with_special_tokens(f"{IM_START}user\n{text}{IM_END}")
    assert ids[0] == tok.token_id(IM_START) and ids[-1] == tok.token_id(IM_END)
    assert tok.token_id(IM_END) not in tok.encode(f"x{IM_END}")
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_clear_errors_for_unusable_paths(tmp_path):
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor"):
        MultimodalTokenizer.load(str(tmp_path))
    with pytest.raises(TokenizerError, match="does not exist"):
        MultimodalTokenizer.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "vocab.txt"
    bad.write_text("x")
    with pytest.raises(TokenizerError, match="not a tokenizer.json"):
        MultimodalTokenizer.load(str(bad))
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        MultimodalTokenizer.load(str(tmp_path))
    assert os.path.exists(broken)
