"""Tokenizer wrapper for preprocessing and the reader: HF `tokenizers` or sentencepiece, plus VLM tokens.

`MultimodalTokenizer.load(path)` opens a `tokenizer.json` (a file, or a directory holding one) with the
HF `tokenizers` library, or a sentencepiece `.model`. It guarantees that the image tokens `<img>`,
`</img>`, `<IMG_CONTEXT>` and the chat tokens `<|im_start|>`, `<|im_end|>` exist as single special
tokens: missing ones are appended after the vocabulary in that order, and `identity()` records which
were added, so a dataset's manifest says exactly which ids its tokens mean.

Special tokens in user text. `encode(text)` never turns text into a special token: the literal string
"<|im_end|>" inside a caption or an answer is tokenized as ordinary characters. Only the chat template
emits special tokens (through `token_id(name)`). InternVL's trainer tokenizes the rendered prompt with
special-token parsing, so the two differ only on text that contains a special token's literal string;
here such text cannot inject a control token from crawled data. Non-special added tokens of the base
tokenizer (for example Qwen3's `<think>`) are ordinary vocabulary and are matched as HF matches them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Order matters: tokens missing from the base vocabulary are appended in this order.
REQUIRED_SPECIAL_TOKENS: tuple[str, ...] = (IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT)


class TokenizerError(ValueError):
    """The tokenizer path is unusable, or a required token cannot be provided."""


@dataclass(frozen=True)
class ImageTokenIds:
    """Ids the reader uses to expand an image slot into `<img>` + N * `<IMG_CONTEXT>` + `</img>`."""

    img_start: int
    img_context: int
    img_end: int

    def as_dict(self) -> dict[str, int]:
        return {"img_start": self.img_start, "img_context": self.img_context, "img_end": self.img_end}


def _sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_tokenizer_file(path: str) -> tuple[str, str]:
    """(file, kind) for a tokenizer path: kind is "hf" for tokenizer.json, "sentencepiece" for .model."""
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.json")
        if os.path.isfile(candidate):
            return candidate, "hf"
        models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
        if models:
            return os.path.join(path, models[0]), "sentencepiece"
        raise TokenizerError(
            f"{path}: directory has neither tokenizer.json nor a sentencepiece *.model file; "
            "pass the directory of a HuggingFace tokenizer or the .model file itself"
        )
    if not os.path.exists(path):
        raise TokenizerError(f"{path}: tokenizer path does not exist")
    if path.endswith(".json"):
        return path, "hf"
    if path.endswith(".model"):
        return path, "sentencepiece"
    raise TokenizerError(
        f"{path}: not a tokenizer.json or sentencepiece .model file (name it *.json or *.model, "
        "or pass its directory)"
    )


class MultimodalTokenizer:
    """A text tokenizer with the VLM's special tokens guaranteed; picklable for worker processes."""

    def __init__(self, path: str, extra_special_tokens: Sequence[str] = ()):
        self.path = os.path.abspath(path)
        self.file, self.kind = resolve_tokenizer_file(self.path)
        self._extra = tuple(extra_special_tokens)
        self._load()

    @classmethod
    def load(cls, path: str, extra_special_tokens: Sequence[str] = ()) -> MultimodalTokenizer:
        """Open `path` (tokenizer.json, its directory, or a .model) and ensure the required tokens exist."""
        return cls(path, extra_special_tokens)

    # -- construction -------------------------------------------------------------------------------

    def _load(self) -> None:
        wanted = list(REQUIRED_SPECIAL_TOKENS) + [t for t in self._extra if t not in REQUIRED_SPECIAL_TOKENS]
        self.added_tokens: dict[str, int] = {}
        if self.kind == "hf":
            self._load_hf(wanted)
        else:
            self._load_sentencepiece(wanted)

    def _load_hf(self, wanted: list[str]) -> None:
        from tokenizers import AddedToken, Tokenizer

        try:
            tok = Tokenizer.from_file(self.file)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{self.file}: cannot load as a HuggingFace tokenizer.json: {e}") from e
        self.base_vocab_size = tok.get_vocab_size(with_added_tokens=True)
        for name in wanted:
            existing = tok.token_to_id(name)
            if existing is None:
                tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
                new_id = tok.token_to_id(name)
                if new_id is None:
                    raise TokenizerError(f"{self.file}: could not add special token {name!r}")
                self.added_tokens[name] = new_id
            else:
                special = {t.content: t.special for t in tok.get_added_tokens_decoder().values()}
                if not special.get(name, False):
                    # An ordinary vocabulary word of that spelling would be split from text; make it special.
                    tok.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        # Keep user text from ever producing special tokens (see the module docstring).
        tok.encode_special_tokens = True
        self._hf = tok
        self._sp = None
        self._vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def _load_sentencepiece(self, wanted: list[str]) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(self.file)
        except Exception as e:  # sentencepiece raises OSError or RuntimeError depending on version
            raise TokenizerError(f"{self.file}: cannot load as a sentencepiece model: {e}") from e
        self.base_vocab_size = sp.GetPieceSize()
        self._sp_special: dict[str, int] = {}
        next_id = self.base_vocab_size
        for name in wanted:
            piece_id = sp.PieceToId(name)
            if piece_id != sp.unk_id() or name == sp.IdToPiece(sp.unk_id()):
                self._sp_special[name] = piece_id
            else:
                self._sp_special[name] = next_id
                self.added_tokens[name] = next_id
                next_id += 1
        self._sp_special_by_id = {v: k for k, v in self._sp_special.items()}
        self._sp = sp
        self._hf = None
        self._vocab_size = next_id

    def __getstate__(self) -> dict:
        # Native tokenizer objects are rebuilt from the file in the worker (cheap, and exact).
        return {"path": self.path, "extra": self._extra}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self.file, self.kind = resolve_tokenizer_file(self.path)
        self._extra = state["extra"]
        self._load()

    # -- public API ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (the embedding table needs at least this many rows)."""
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; special-token strings in `text` stay ordinary characters."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.EncodeAsIds(text)

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Token ids with special-token strings parsed (as InternVL's trainer does); for tests and tools."""
        if self._hf is not None:
            self._hf.encode_special_tokens = False
            try:
                return self._hf.encode(text, add_special_tokens=False).ids
            finally:
                self._hf.encode_special_tokens = True
        ids: list[int] = []
        rest = text
        while rest:
            hits = [(rest.find(name), name) for name in self._sp_special if rest.find(name) >= 0]
            if not hits:
                ids.extend(self._sp.EncodeAsIds(rest))
                break
            pos, name = min(hits)
            ids.extend(self._sp.EncodeAsIds(rest[:pos]))
            ids.append(self._sp_special[name])
            rest = rest[pos + len(name) :]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens written out by name."""
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._sp_special_by_id:
                out.append(self._sp.DecodeIds(run))
                run = []
                out.append(self._sp_special_by_id[i])
            else:
                run.append(i)
        out.append(self._sp.DecodeIds(run))
        return "".join(out)

    def token_id(self, name: str) -> int:
        """Id of a single token given by its string, e.g. "<|im_end|>"; KeyError if it is not one token."""
        if self._hf is not None:
            tid = self._hf.token_to_id(name)
        else:
            tid = self._sp_special.get(name)
            if tid is None:
                piece = self._sp.PieceToId(name)
                tid = None if piece == self._sp.unk_id() else piece
        if tid is None:
            raise KeyError(f"{name!r} is not a single token of {self.file}")
        return tid

    @property
    def special_token_names(self) -> tuple[str, ...]:
        """The tokens this wrapper guarantees as single special tokens (the required ones, then extras)."""
        return REQUIRED_SPECIAL_TOKENS + tuple(t for t in self._extra if t not in REQUIRED_SPECIAL_TOKENS)

    def hf_backend(self):
        """A copy of the wrapped ``tokenizers.Tokenizer`` (kind "hf") with the required tokens added,
        parsing special-token strings in text as transformers does (for exports); None for sentencepiece."""
        if self._hf is None:
            return None
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(self._hf.to_str())
        copy.encode_special_tokens = False
        return copy

    @property
    def image_token_ids(self) -> ImageTokenIds:
        return ImageTokenIds(self.token_id(IMG_START), self.token_id(IMG_CONTEXT), self.token_id(IMG_END))

    def identity(self) -> dict:
        """What a manifest records so a dataset can be checked against the tokenizer that reads it."""
        return {
            "path": self.path,
            "file": os.path.basename(self.file),
            "kind": self.kind,
            "sha256": _sha256_of_file(self.file),
            "base_vocab_size": self.base_vocab_size,
            "vocab_size": self.vocab_size,
            "added_tokens": dict(self.added_tokens),
            "special_token_ids": {name: self.token_id(name) for name in REQUIRED_SPECIAL_TOKENS},
        }

    def __repr__(self) -> str:
        return f"MultimodalTokenizer({self.file!r}, kind={self.kind}, vocab_size={self.vocab_size})"
