"""A tiny chat-capable HuggingFace InternVL directory: byte-level tokenizer + random model whose
greedy answers vary token to token (a degenerate model repeating one token would hide cache bugs)."""

from __future__ import annotations

import io
import json

import torch
from model_utils import tiny_hf_config

SPECIALS = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<|endoftext|>"]
VOCAB = 264  # 256 bytes + the special tokens above, rounded up
IMG_CONTEXT_ID = 256 + SPECIALS.index("<IMG_CONTEXT>")


def write_byte_tokenizer(directory) -> None:
    """tokenizer.json: byte-level BPE without merges (one token per byte) and the chat/image tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: ord(c))
    vocab = {c: i for i, c in enumerate(byte_chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(directory / "tokenizer.json"))


def chatty_hf_model(
    seed: int = 0, vision_layers: int = 5, language_layers: int = 2, num_key_value_heads: int = 2
):
    """Tiny InternVLForConditionalGeneration (fp32, eager attention) on the byte vocabulary."""
    from transformers import InternVLForConditionalGeneration

    config = tiny_hf_config(-1, vision_layers=vision_layers, language_layers=language_layers)
    config.text_config.vocab_size = VOCAB
    config.text_config.num_key_value_heads = num_key_value_heads
    config.image_token_id = IMG_CONTEXT_ID
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lambda_1", "lambda_2")) or "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif "language_model" in name or "lm_head" in name:
                param.copy_(0.2 * torch.randn_like(param))  # sharp enough that greedy answers vary
            else:
                param.copy_(0.05 * torch.randn_like(param))
    return model


def save_chat_dir(model, directory) -> None:
    """save_pretrained + tokenizer.json + an InternVL chat config hint (template, tiling)."""
    model.save_pretrained(directory, safe_serialization=True)
    write_byte_tokenizer(directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["max_dynamic_patch"] = 4
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
