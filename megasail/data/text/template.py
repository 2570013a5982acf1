"""Prompt templates: a conversation becomes typed segments (prompt text, target text, image slots).

    Conversation --template.render--> [Piece] --tokenize_pieces--> [TokenizedSegment]

A `Piece` is text, one special token or an image slot; its `SegmentMode` says whether it carries
loss. The templates' exact strings and where the loss falls: docs/preprocessing.md ("Templates").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from megasail.data.format.codes import SegmentMode
from megasail.data.text.tokenizer import (
    IM_END,
    IM_START,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    MultimodalTokenizer,
)

IMAGE_TAG = "<image>"
ROLES = ("system", "user", "assistant")
INTERNVL_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


class TemplateError(ValueError):
    """A conversation that no template can render; `reason` is the reject reason preprocessing counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Turn:
    role: str  # "system", "user" or "assistant"
    text: str


@dataclass(frozen=True)
class Conversation:
    """A sample before templating: turns and how many images it carries (bytes live elsewhere)."""

    turns: tuple[Turn, ...]
    num_images: int = 0
    kind: str = "chat"  # "chat", "caption" or "text": which template family renders it


@dataclass(frozen=True)
class Piece:
    """One rendered piece: text, a single special token (`special=True`, text = its string), or an image."""

    mode: SegmentMode
    text: str = ""
    special: bool = False
    image: int = -1  # sample-local image ordinal when mode is IMAGE


@dataclass
class TokenizedSegment:
    mode: SegmentMode
    token_ids: list[int] = field(default_factory=list)  # for IMAGE: [image ordinal]


def _prompt(text: str) -> Piece:
    return Piece(SegmentMode.PROMPT, text)


def _special(name: str, mode: SegmentMode = SegmentMode.PROMPT) -> Piece:
    return Piece(mode, name, special=True)


def _image(k: int) -> Piece:
    return Piece(SegmentMode.IMAGE, image=k)


def resolve_image_tags(conv: Conversation) -> Conversation:
    """Check `<image>` tags against the image count; prepend `<image>\\n` per image when there are none."""
    tags_user = sum(t.text.count(IMAGE_TAG) for t in conv.turns if t.role == "user")
    tags_other = sum(t.text.count(IMAGE_TAG) for t in conv.turns if t.role != "user")
    if tags_other:
        raise TemplateError("image_tag_mismatch", f"{tags_other} <image> tag(s) outside user turns")
    if tags_user == conv.num_images:
        return conv
    if tags_user == 0 and conv.num_images > 0:
        turns = list(conv.turns)
        first = next((i for i, t in enumerate(turns) if t.role == "user"), None)
        if first is None:
            raise TemplateError(
                "image_tag_mismatch", f"{conv.num_images} image(s) but no user turn to hold them"
            )
        turns[first] = Turn("user", (IMAGE_TAG + "\n") * conv.num_images + turns[first].text)
        return Conversation(tuple(turns), conv.num_images, conv.kind)
    raise TemplateError(
        "image_tag_mismatch", f"{tags_user} <image> tag(s) in user turns but {conv.num_images} image(s)"
    )


def _user_pieces(text: str, next_image: int) -> tuple[list[Piece], int]:
    """Split a question at its `<image>` tags into prompt text and image slots."""
    pieces: list[Piece] = []
    parts = text.split(IMAGE_TAG)
    for i, part in enumerate(parts):
        if i > 0:
            pieces.append(_image(next_image))
            next_image += 1
        if part:
            pieces.append(_prompt(part))
    return pieces, next_image


@dataclass(frozen=True)
class ChatTemplate:
    """ChatML-style template (InternVL's MPT separator style) with a configurable separator."""

    name: str
    default_system: str
    separator: str  # emitted after every <|im_end|>

    def render(self, conv: Conversation, system: str | None = None) -> list[Piece]:
        conv = resolve_image_tags(conv)
        turns = list(conv.turns)
        sys_text = self.default_system if system is None else system
        if turns and turns[0].role == "system":
            sys_text = turns.pop(0).text
        if not any(t.role == "assistant" for t in turns):
            raise TemplateError("empty_conversation", "conversation has no assistant turn to learn from")
        sep = [_prompt(self.separator)] if self.separator else []
        pieces = [_special(IM_START), _prompt(f"system\n{sys_text}"), _special(IM_END), *sep]
        next_image = 0
        for turn in turns:
            if turn.role == "user":
                body, next_image = _user_pieces(turn.text, next_image)
                pieces += [_special(IM_START), _prompt("user\n"), *body, _special(IM_END), *sep]
            elif turn.role == "assistant":
                pieces += [_special(IM_START), _prompt("assistant\n")]
                if turn.text:
                    pieces.append(Piece(SegmentMode.TARGET, turn.text))
                pieces += [_special(IM_END, SegmentMode.TARGET), *sep]
            else:
                raise TemplateError("malformed_record", f"a {turn.role!r} turn after the first turn")
        return pieces

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": "chat",
            "separator": self.separator,
            "default_system": self.default_system,
        }


@dataclass(frozen=True)
class CaptionTemplate:
    """Image-caption pretraining: every image slot, then the caption and `<|im_end|>` as the target."""

    name: str = "caption"

    def render(self, conv: Conversation, system: str | None = None) -> list[Piece]:
        text = "".join(t.text for t in conv.turns if t.role == "assistant")
        if not text:
            raise TemplateError("empty_conversation", "caption is empty")
        if IMAGE_TAG in text:
            raise TemplateError("image_tag_mismatch", "caption text contains an <image> tag")
        images = [_image(k) for k in range(conv.num_images)]
        return [*images, Piece(SegmentMode.TARGET, text), _special(IM_END, SegmentMode.TARGET)]

    def describe(self) -> dict:
        return {"name": self.name, "kind": "caption", "end_token": IM_END}


@dataclass(frozen=True)
class TextTemplate:
    """Text-only pretraining document: the text and `<|im_end|>`, all of it target."""

    name: str = "text"

    def render(self, conv: Conversation, system: str | None = None) -> list[Piece]:
        if conv.num_images:
            raise TemplateError("image_tag_mismatch", "text template got a sample with images")
        text = "".join(t.text for t in conv.turns)
        if not text:
            raise TemplateError("empty_conversation", "text is empty")
        return [Piece(SegmentMode.TARGET, text), _special(IM_END, SegmentMode.TARGET)]

    def describe(self) -> dict:
        return {"name": self.name, "kind": "text", "end_token": IM_END}


TEMPLATES = {
    "sailvl-chat": ChatTemplate("sailvl-chat", default_system="", separator=""),
    "internvl2_5": ChatTemplate("internvl2_5", default_system=INTERNVL_SYSTEM_MESSAGE, separator="\n"),
    "caption": CaptionTemplate(),
    "text": TextTemplate(),
}


def get_template(name: str):
    """The template registered as `name`; ValueError listing the known names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


def tokenize_pieces(pieces: Sequence[Piece], tokenizer: MultimodalTokenizer) -> list[TokenizedSegment]:
    """Token ids per segment, equal to tokenizing the whole rendered string at once.

    Special tokens and image slots split BPE pre-tokenization, so each text run between them is
    encoded whole. Inside a run (e.g. "assistant\\n" + answer) the prompt/target boundary is placed
    after as many tokens as the prompt prefix encodes to alone, exactly as InternVL masks
    `<|im_start|>assistant\\n`; a token merging across the boundary therefore stays unmasked-target.
    """
    segments: list[TokenizedSegment] = []

    def emit(mode: SegmentMode, ids: list[int]) -> None:
        if not ids:
            return
        if segments and segments[-1].mode == mode and mode != SegmentMode.IMAGE:
            segments[-1].token_ids.extend(ids)
        else:
            segments.append(TokenizedSegment(mode, list(ids)))

    run: list[Piece] = []

    def flush_run() -> None:
        merged: list[tuple[SegmentMode, str]] = []
        for p in run:
            if merged and merged[-1][0] == p.mode:
                merged[-1] = (p.mode, merged[-1][1] + p.text)
            else:
                merged.append((p.mode, p.text))
        run.clear()
        if not merged:
            return
        if len(merged) == 1:
            emit(merged[0][0], tokenizer.encode(merged[0][1]))
            return
        whole = tokenizer.encode("".join(text for _, text in merged))
        start, prefix = 0, ""
        for i, (mode, text) in enumerate(merged):
            prefix += text
            end = len(whole) if i == len(merged) - 1 else len(tokenizer.encode(prefix))
            end = min(max(end, start), len(whole))
            emit(mode, whole[start:end])
            start = end

    for piece in pieces:
        if piece.mode == SegmentMode.IMAGE:
            flush_run()
            segments.append(TokenizedSegment(SegmentMode.IMAGE, [piece.image]))
        elif piece.special:
            flush_run()
            emit(piece.mode, [tokenizer.token_id(piece.text)])
        else:
            run.append(piece)
    flush_run()
    return segments


def render_text(pieces: Sequence[Piece], image_tokens: Sequence[int] | None = None) -> str:
    """The template as one string; image slots become `<image>`, or their full expansion when
    `image_tokens[k]` (tokens of image k, including `<img>` and `</img>`) is given."""
    out = []
    for p in pieces:
        if p.mode == SegmentMode.IMAGE:
            if image_tokens is None:
                out.append(IMAGE_TAG)
            else:
                out.append(IMG_START + IMG_CONTEXT * (image_tokens[p.image] - 2) + IMG_END)
        else:
            out.append(p.text)
    return "".join(out)


def expand_segments(
    segments: Sequence[TokenizedSegment], tokenizer: MultimodalTokenizer, image_tokens: Sequence[int]
) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) with image slots expanded; the reference for the reader's expansion."""
    ids = tokenizer.image_token_ids
    input_ids: list[int] = []
    loss: list[int] = []
    for seg in segments:
        if seg.mode == SegmentMode.IMAGE:
            n = image_tokens[seg.token_ids[0]]
            input_ids += [ids.img_start] + [ids.img_context] * (n - 2) + [ids.img_end]
            loss += [0] * n
        else:
            input_ids += seg.token_ids
            loss += [int(seg.mode == SegmentMode.TARGET)] * len(seg.token_ids)
    return input_ids, loss
