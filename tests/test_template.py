import pytest
from fixtures.multimodal_data import make_tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megasail.data.text.template import (
    INTERNVL_SYSTEM_MESSAGE,
    Conversation,
    SegmentMode,
    TemplateError,
    Turn,
    expand_segments,
    get_template,
    render_text,
    tokenize_pieces,
)
from megasail.data.text.tokenizer import MultimodalTokenizer


def chat(*texts, num_images=0, system=None):
    turns = [Turn("system", system)] if system is not None else []
    turns += [Turn("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]
    return Conversation(tuple(turns), num_images)


def test_sailvl_chat_exact_string_has_no_newline_after_im_end():
    pieces = get_template("sailvl-chat").render(
        chat("<image>\nWhat?", "A cat.", num_images=1, system="Be brief.")
    )
    assert render_text(pieces) == (
        "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n<image>\nWhat?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|>"
    )


def test_internvl2_5_exact_string_and_default_system():
    pieces = get_template("internvl2_5").render(chat("Hi", "Hello", "Bye", "Ciao"))
    assert render_text(pieces) == (
        f"<|im_start|>system\n{INTERNVL_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\nCiao<|im_end|>\n"
    )


def test_loss_only_on_answers_and_their_im_end(qwen):
    for name, tail in (("sailvl-chat", ""), ("internvl2_5", "\n")):
        segments = tokenize_pieces(get_template(name).render(chat("Q1", "A one", "Q2", "A two")), qwen)
        targets = [qwen.decode(s.token_ids) for s in segments if s.mode == SegmentMode.TARGET]
        assert targets == ["A one<|im_end|>", "A two<|im_end|>"]
        assert segments[-1].mode == (SegmentMode.PROMPT if tail else SegmentMode.TARGET)
        if tail:
            assert qwen.decode(segments[-1].token_ids) == "\n"  # the separator is never learned


def test_image_without_tag_is_prepended_to_first_user_turn():
    pieces = get_template("sailvl-chat").render(chat("Describe.", "Ok.", num_images=2))
    assert "user\n<image>\n<image>\nDescribe.<|im_end|>" in render_text(pieces)
    assert [p.image for p in pieces if p.mode == SegmentMode.IMAGE] == [0, 1]


@pytest.mark.parametrize(
    "conv, reason",
    [
        (chat("<image><image> two?", "x", num_images=1), "image_tag_mismatch"),
        (chat("one <image>", "x", num_images=0), "image_tag_mismatch"),
        (chat("q", "<image> in answer", num_images=1), "image_tag_mismatch"),
        (chat("only a question"), "empty_conversation"),
        (Conversation(()), "empty_conversation"),
    ],
)
def test_bad_conversations_raise_with_reason(conv, reason):
    with pytest.raises(TemplateError) as err:
        get_template("sailvl-chat").render(conv)
    assert err.value.reason == reason


def test_caption_and_text_templates(qwen):
    cap = Conversation((Turn("assistant", "Two dogs."),), num_images=1, kind="caption")
    segs = tokenize_pieces(get_template("caption").render(cap), qwen)
    assert [s.mode for s in segs] == [SegmentMode.IMAGE, SegmentMode.TARGET]
    assert segs[0].token_ids == [0] and qwen.decode(segs[1].token_ids) == "Two dogs.<|im_end|>"
    txt = Conversation((Turn("assistant", "Plain text."),), kind="text")
    segs = tokenize_pieces(get_template("text").render(txt), qwen)
    assert [s.mode for s in segs] == [SegmentMode.TARGET]


def test_system_turn_in_data_overrides_default():
    text = render_text(get_template("internvl2_5").render(chat("q", "a", system="Custom.")))
    assert text.startswith("<|im_start|>system\nCustom.<|im_end|>\n")


def _assert_matches_whole_string(tok, template, conv, image_tokens):
    pieces = get_template(template).render(conv)
    segments = tokenize_pieces(pieces, tok)
    ids, loss = expand_segments(segments, tok, image_tokens)
    assert ids == tok.encode_with_special_tokens(render_text(pieces, image_tokens))
    assert len(loss) == len(ids)


TRICKY = [
    chat("<image>\nWhat is this?", "A cat.", num_images=1),
    chat("Look: <image> and <image>, compare.", "  Leading spaces\n\nand blank lines  ", num_images=2),
    chat("数字 123 <image>", "\nNewline first. 456789", "again?", "Yes!!", num_images=1),
    chat("tabs\tand 'quotes'", "don't stop; it's 3.14 ≈ π"),
]


@pytest.mark.parametrize("template", ["sailvl-chat", "internvl2_5"])
@pytest.mark.parametrize("conv", TRICKY)
def test_segments_equal_whole_string_tokenization_qwen(qwen, template, conv):
    _assert_matches_whole_string(qwen, template, conv, [258, 1282, 2])


_text = st.lists(
    st.sampled_from(list("ab c\n\t.,'!?0123 猫Ωé") + ["  ", "\n\n", "'s", " 12"]), max_size=12
).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    q=_text,
    a=_text,
    q2=_text,
    a2=_text,
    with_image=st.booleans(),
    template=st.sampled_from(["sailvl-chat", "internvl2_5"]),
)
def test_segments_equal_whole_string_tokenization_property(qwen, q, a, q2, a2, with_image, template):
    conv = chat(("<image>" if with_image else "") + q, a, q2, a2, num_images=int(with_image))
    _assert_matches_whole_string(qwen, template, conv, [514])


def test_tiny_tokenizer_also_matches(tmp_path):
    tok = MultimodalTokenizer.load(make_tiny_tokenizer(str(tmp_path)))
    for conv in TRICKY:
        _assert_matches_whole_string(tok, "sailvl-chat", conv, [258, 258])
