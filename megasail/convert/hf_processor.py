"""The tokenizer and processor files of a HuggingFace export, made from megasail's own tokenizer and
prompt settings, so ``AutoTokenizer`` / ``AutoProcessor`` encode text and images as megasail does.

``write_processor_files(out_dir, tokenizer, prompt, config)`` writes:

- ``tokenizer.json``: the ``MultimodalTokenizer``'s vocabulary with megasail's added tokens at their
  ids. A HF tokenizer.json is written as megasail loads it; a sentencepiece ``.model`` is converted
  with transformers' ``SpmConverter.build_tokenizer_from_spm_proto`` (the model's own normaliser,
  dummy prefix per text run, BPE merges ranked by score or unigram). Post-processors that add
  tokens (BOS) are dropped: megasail never adds them.
- ``tokenizer_config.json``: eos ``<|im_end|>``, pad, and the named image tokens InternVLProcessor
  reads (``start_image_token`` ``<img>``, ``end_image_token`` ``</img>``, ``context_image_token``
  ``<IMG_CONTEXT>``, ``video_token`` ``<video>``, which transformers appends to the vocabulary).
- ``chat_template.jinja``: the checkpoint's template (``hf_chat_template``).
- ``preprocessor_config.json``: GotOcr2's image processor with InternVL tiling (``crop_to_patches``,
  min/max tiles, the tile size, bicubic, ImageNet mean/std).
- ``processor_config.json``: InternVLProcessor with ``image_seq_length`` = tokens per tile.

Where transformers' processor differs from megasail: docs/checkpoints.md ("Tokenizer and processor").
"""

from __future__ import annotations

import json
import logging
import os

from megasail.convert.hf_chat_template import chat_template_jinja
from megasail.data.images.decode import IMAGENET_MEAN, IMAGENET_STD
from megasail.data.text.tokenizer import (
    IM_END,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    MultimodalTokenizer,
)
from megasail.inference.prompt import PromptSettings
from megasail.models.config import ModelConfig

log = logging.getLogger(__name__)

PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)
VIDEO_TOKEN = "<video>"  # InternVLProcessor requires a video token; megasail has no video
_PIL_BICUBIC = 3
# Below this many minimum tiles transformers' grid choice equals InternVL's for every image
# (docs/checkpoints.md); from 4 on, an exact aspect-ratio tie between grids of one area can differ.
_TIE_ORDER_SAFE_MIN_TILES = 3


def _sentencepiece_backend(tokenizer: MultimodalTokenizer):
    """A ``tokenizers.Tokenizer`` that encodes as the sentencepiece model of ``tokenizer``."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    with open(tokenizer.file, "rb") as f:
        proto.ParseFromString(f.read())
    kind = proto.trainer_spec.model_type  # 1 unigram, 2 bpe, 3 word, 4 char
    if kind == 1:
        vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    elif kind == 2:
        vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    else:
        raise ValueError(
            f"{tokenizer.file}: only unigram and BPE sentencepiece models export (model_type {kind})"
        )
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)  # dummy prefix per run
    control = [piece.piece for piece in proto.pieces if piece.type == 3]  # never produced from text
    return backend, control


def tokenizer_backend(tokenizer: MultimodalTokenizer):
    """The ``tokenizers.Tokenizer`` of an export: ``tokenizer``'s ids, special tokens parsed from text."""
    from tokenizers import AddedToken

    if tokenizer.kind == "hf":
        backend, control = tokenizer.hf_backend(), []
    else:
        backend, control = _sentencepiece_backend(tokenizer)
    wanted = dict.fromkeys(control)
    wanted.update((name, None) for name in tokenizer.special_token_names)
    ids = {name: tokenizer.token_id(name) for name in wanted if _has(tokenizer, name)}
    for name in sorted(ids, key=ids.get):  # appended tokens get their ids in this order
        backend.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        if backend.token_to_id(name) != ids[name]:
            raise ValueError(
                f"{tokenizer.file}: {name!r} would be id {backend.token_to_id(name)} in the export, "
                f"megasail uses {ids[name]}"
            )
    if backend.post_processor is not None and backend.post_processor.num_special_tokens_to_add(False):
        backend.post_processor = None  # megasail adds no BOS/EOS around a text
    return backend


def _has(tokenizer: MultimodalTokenizer, name: str) -> bool:
    try:
        tokenizer.token_id(name)
        return True
    except KeyError:
        return False


def tokenizer_config(tokenizer: MultimodalTokenizer, max_length: int) -> dict:
    """tokenizer_config.json: the special tokens by role and InternVL's named image tokens."""
    pad = next((t for t in ("<|endoftext|>", "<pad>") if _has(tokenizer, t)), None)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "eos_token": IM_END,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # megasail decodes without it
        "extra_special_tokens": {
            "start_image_token": IMG_START,
            "end_image_token": IMG_END,
            "context_image_token": IMG_CONTEXT,
            "video_token": VIDEO_TOKEN,
        },
    }
    if pad is not None:
        config["pad_token"] = pad
    if tokenizer.kind == "sentencepiece":  # the piece unknown characters encode to
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tokenizer.file)
        config["unk_token"] = sp.IdToPiece(sp.unk_id())
    return config


def image_processor_config(prompt: PromptSettings) -> dict:
    """preprocessor_config.json: GotOcr2's image processor doing InternVL's dynamic tiling."""
    return {
        "image_processor_type": "GotOcr2ImageProcessor",
        "processor_class": "InternVLProcessor",
        "crop_to_patches": True,
        "min_patches": prompt.min_tiles,
        "max_patches": prompt.max_tiles,
        "size": {"height": prompt.tile_size, "width": prompt.tile_size},
        "do_resize": True,
        "resample": _PIL_BICUBIC,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_rgb": True,
    }


def write_processor_files(
    out_dir: str, tokenizer: MultimodalTokenizer, prompt: PromptSettings, config: ModelConfig
) -> list[str]:
    """Write the files of ``PROCESSOR_FILES`` into ``out_dir``; returns their names."""
    image_token = tokenizer.token_id(IMG_CONTEXT)
    if image_token != config.image_token_id:
        raise ValueError(
            f"{tokenizer.file}: <IMG_CONTEXT> is id {image_token} but the model's image_token_id is "
            f"{config.image_token_id}: pass the tokenizer the model was trained with (--tokenizer)"
        )
    if tokenizer.vocab_size > config.language.vocab_size:
        raise ValueError(
            f"{tokenizer.file}: {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{config.language.vocab_size}: pass the tokenizer the model was trained with (--tokenizer)"
        )
    if prompt.min_tiles > _TIE_ORDER_SAFE_MIN_TILES:
        log.warning(
            "min_tiles %d: transformers' image processor may pick another tile grid than megasail on an "
            "exact aspect-ratio tie (docs/checkpoints.md, 'Tokenizer and processor')",
            prompt.min_tiles,
        )
    tokenizer_backend(tokenizer).save(os.path.join(out_dir, "tokenizer.json"))
    files = {
        "tokenizer_config.json": tokenizer_config(tokenizer, config.language.max_position_embeddings),
        "preprocessor_config.json": image_processor_config(prompt),
        "processor_config.json": {
            "processor_class": "InternVLProcessor",
            "image_seq_length": config.tokens_per_tile,
        },
    }
    for name, content in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(chat_template_jinja(prompt.template, prompt.system_message))
    return list(PROCESSOR_FILES)
