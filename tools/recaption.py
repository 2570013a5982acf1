#!/usr/bin/env python
"""Caption images at scale with a megasail checkpoint (or a HuggingFace InternVL / SAIL-VL directory).

    torchrun --nproc-per-node 8 tools/recaption.py --load CKPT --images SRC --output OUT_DIR \\
        [--prompt-bank FILE] [--batch-size 16] [--max-new-tokens 256] [--max-tiles 6] [--seed 0] [--resume]

SRC: a directory of images (recursive; id = path relative to it), a JSONL with an "image" field
(id = its "id" field, else the image path; other fields are carried to the output), or webdataset
tars ('shards/*.tar', read as streams; id = SHARD#KEY). Ranks beyond --tensor-parallel x
--pipeline-parallel are data-parallel writers; each captions the images whose id hashes to it.

Output, one line per input id in exactly one of:
  OUT_DIR/captions-*.jsonl  {"id", "image", "caption", "prompt_id", "model", "caption_tokens", ...carried}
  OUT_DIR/filtered-*.jsonl  the same plus "reason" (empty, repetition, refusal, truncated, too_short, too_long)
  OUT_DIR/rejects-*.jsonl   {"id", "image", "reason", "message", "attempts", ...carried}: unreadable images
Captions are caption records for tools/preprocess_data.py (--image-root = the root printed at the end).
--resume after any interruption (kill -9 included) captions what is left, nothing twice.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None):
    from megasail.curation.filters import FilterConfig
    from megasail.data.images.formats import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS

    defaults = FilterConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True,
                   help="megasail checkpoint dir (root or iter_*) or a HuggingFace InternVL dir (converted in memory)")
    p.add_argument("--images", required=True, help="image directory, JSONL file(s) or tar shards (globs quoted)")
    p.add_argument("--output", required=True, help="output directory (captions, filtered, rejects, progress)")
    p.add_argument("--image-root", help="JSONL sources: directory the image paths are relative to "
                                        "(default: the JSONL file's directory)")
    p.add_argument("--prompt-bank", help="YAML/JSON list of {id, text, weight[, min_tokens, max_tokens]} "
                                         "(default: detailed 0.5, ocr 0.3, short 0.2)")
    p.add_argument("--batch-size", type=int, default=16, help="images generated together per writer")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per caption (hitting it: truncated)")
    p.add_argument("--max-tiles", type=int, default=6, help="most tiles per image (InternVL dynamic tiling)")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompt choice per id (and sampling)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    p.add_argument("--overwrite", action="store_true", help="delete earlier output in --output and start over")
    p.add_argument("--model-name", help='the "model" field of each line (default: the --load directory name)')
    p.add_argument("--tensor-parallel", type=int, default=1, help="tensor-parallel size (launch with torchrun)")
    p.add_argument("--pipeline-parallel", type=int, default=1, help="pipeline-parallel size (launch with torchrun)")
    p.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the checkpoint's)")
    p.add_argument("--template", help="chat template name (default: the checkpoint's data template)")
    p.add_argument("--system", help="system message (default: the template's)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--transformer-impl", default="local", choices=("local", "te"),
                   help="layers to build; padded batches need local attention")
    p.add_argument("--decode-backend", default="auto", choices=("auto", "pil", "dali"),
                   help="image decoding: auto = DALI mixed on GPU, per image by size on CPU")
    p.add_argument("--temperature", type=float, help="sample with this temperature (default: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature)")
    p.add_argument("--no-bucket", action="store_true", help="batch in input order instead of by tile count")
    p.add_argument("--prefetch-batches", type=int, default=2, help="batches read and decoded ahead in a thread")
    p.add_argument("--no-fsync", action="store_true", help="skip fsync at each commit (faster; a machine crash "
                                                           "may then lose committed lines)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                   help="larger image files or tar members are rejected unread (image_too_large)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="images whose header declares more pixels are rejected undecoded (image_too_large)")
    f = p.add_argument_group("caption filters (each counted in the summary; filtered captions are kept with their reason)")
    f.add_argument("--min-caption-tokens", type=int, default=defaults.min_tokens, help="shorter captions: too_short")
    f.add_argument("--max-caption-tokens", type=int, default=defaults.max_tokens,
                   help="longer captions: too_long (default: none besides --max-new-tokens)")
    f.add_argument("--ngram", type=int, default=defaults.ngram, help="word n-gram size of the repetition filter")
    f.add_argument("--max-ngram-repeats", type=int, default=defaults.max_ngram_repeats,
                   help="an n-gram seen more often than this: repetition")
    f.add_argument("--refusal-phrases", help="text file, one phrase per line, replacing the built-in refusal list")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.max_tiles < 1:
        p.error("--batch-size, --max-new-tokens and --max-tiles must be >= 1")
    if args.resume and args.overwrite:
        p.error("give --resume or --overwrite, not both")
    return args


def config_from_args(args):
    from megasail.curation import RecaptionConfig
    from megasail.curation.filters import FilterConfig

    filters = FilterConfig(min_tokens=args.min_caption_tokens, max_tokens=args.max_caption_tokens,
                           ngram=args.ngram, max_ngram_repeats=args.max_ngram_repeats)
    if args.refusal_phrases:
        with open(args.refusal_phrases, encoding="utf-8") as fh:
            filters.refusals = tuple(line.strip().lower() for line in fh if line.strip())
    return RecaptionConfig(
        load=args.load, images=args.images, output=args.output, prompt_bank=args.prompt_bank,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_tiles=args.max_tiles, seed=args.seed,
        resume=args.resume, overwrite=args.overwrite, image_root=args.image_root, model_name=args.model_name,
        tokenizer=args.tokenizer, template=args.template, system=args.system, precision=args.precision,
        transformer_impl=args.transformer_impl, decode_backend=args.decode_backend, temperature=args.temperature,
        top_p=args.top_p, bucket=not args.no_bucket, prefetch_batches=args.prefetch_batches,
        fsync=not args.no_fsync, progress=not args.no_progress, max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels, filters=filters,
    )  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from megasail import runtime
    from megasail.curation import RecaptionError, run_recaption

    runtime.initialize(args.tensor_parallel, args.pipeline_parallel, seed=args.seed)
    try:
        run_recaption(config_from_args(args))
        return 0
    except RecaptionError as e:
        import torch.distributed as dist

        if dist.get_rank() == 0:
            print(f"recaption: error: {e}", file=sys.stderr)
        return 2
    finally:
        runtime.destroy()


if __name__ == "__main__":
    sys.exit(main())
