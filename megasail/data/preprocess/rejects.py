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


# what to try first when a reason dominates (printed with a run that kept no sample)
REJECT_HINTS: dict[str, str] = {
    "image_missing": "image paths are relative to --image-root, or to the JSONL file's directory without it",
    "image_path_outside_root": "image paths must stay inside --image-root",
    "malformed_json": "inputs must be JSON Lines, one object per line; convert a JSON array with jq -c '.[]'",
    "missing_field": "check the record fields against --input-format (see --help)",
    "image_tag_mismatch": "each <image> tag needs one image in the record's image field",
    "too_long": "raise --max-seq-length, lower --max-tiles, or pass --on-too-long truncate",
    "image_too_large": "raise --max-image-pixels or --max-image-bytes if the images are trusted",
}


def top_reject_reasons(rejected_by_reason: dict[str, int], limit: int = 3) -> list[tuple[str, int]]:
    """The `limit` most frequent (reason, count), most first (ties by name)."""
    return sorted(rejected_by_reason.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


def reject_summary(rejected_by_reason: dict[str, int], limit: int = 3) -> str:
    """'image_missing 5, malformed_json 2 and 1 more reason(s)': the most frequent reasons first."""
    top = top_reject_reasons(rejected_by_reason, limit)
    text = ", ".join(f"{reason} {count}" for reason, count in top) or "none"
    more = len(rejected_by_reason) - len(top)
    return text + (f" and {more} more reason(s)" if more > 0 else "")


def empty_prefix_reason(prefix: str, manifest: dict | None) -> str:
    """Why a prefix holds no sample, from its manifest: records read and rejected, the top reasons, and
    where each reject is listed."""
    if manifest is None:
        return f"{prefix}.manifest.json is missing"
    counts = manifest.get("counts", {})
    read, rejected = counts.get("read", "?"), counts.get("rejected", "?")
    if read == 0:
        return f"{prefix}.manifest.json: preprocessing read no record from its inputs"
    return (f"{prefix}.manifest.json: {read} records read, {rejected} rejected "
            f"({reject_summary(manifest.get('rejected_by_reason', {}))}); every reject with its file:line in "
            f"{prefix}.rejects.jsonl")
