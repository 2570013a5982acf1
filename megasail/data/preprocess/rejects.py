"""Why a record was rejected: the fixed set of reasons preprocessing counts and reports."""

from __future__ import annotations

# reason -> what it means; the manifest counts records per reason, the rejects file names one per line.
REJECT_REASONS: dict[str, str] = {
    "malformed_json": "the line is not a JSON object",
    "invalid_utf8": "the line is not valid UTF-8",
    "invalid_text": "the text holds NUL bytes",
    "line_too_long": "the line is longer than --max-line-bytes",
    "missing_field": "a required field is absent (conversations, image, caption, text)",
    "malformed_record": "a field has the wrong type or an unknown value",
    "empty_conversation": "no turns, no assistant turn, or an empty caption/text",
    "image_tag_mismatch": "<image> tags do not match the number of images",
    "image_missing": "an image file does not exist",
    "image_unreadable": "an image file exists but cannot be read",
    "image_unsupported": "the bytes are not an image format Pillow can read or convert",
    "image_corrupt": "the image header or pixel data is broken (full decode failed)",
    "image_empty": "the image file is empty (0 bytes) or has zero width or height",
    "image_too_large": "the image has more pixels than --max-image-pixels or more bytes than --max-image-bytes",
    "image_path_outside_root": "an image path is absolute or leads outside the image root (../, symlinks)",
    "member_too_large": "a webdataset member is larger than its cap (--max-image-bytes for images, 16 MiB for json/txt)",
    "archive_corrupt": "a tar shard is truncated or damaged; members after the damage are lost",
    "too_long": "the sample has more tokens than --max-seq-length and cannot be truncated",
}


class RecordRejected(Exception):
    """A record that cannot become a sample; `reason` is a key of REJECT_REASONS."""

    def __init__(self, reason: str, message: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message
