"""Image validation for preprocessing: sniff the bytes, check the size, decode fully, normalise the format.

JPEG and PNG are kept byte for byte (what the decoder reads at training time is what was crawled).
WebP, GIF, TIFF and BMP are re-encoded as PNG: lossless, so no second
compression of already-compressed pixels; GIFs keep their first frame. Any other format (EPS, PSD,
PPM, ...) is rejected unopened. The extension is never used: the format comes from the bytes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from megasail.data.format.codes import ImageFormat
from megasail.data.images.formats import PIL_FORMATS
from megasail.data.preprocess.rejects import RecordRejected

# Stored byte for byte; MPO (multi-picture JPEG, from the JPEG opener) is still a JPEG stream.
_KEPT_FORMATS = {"JPEG": ImageFormat.JPEG, "MPO": ImageFormat.JPEG, "PNG": ImageFormat.PNG}
ALLOWED_FORMATS = (*PIL_FORMATS, "MPO")  # what Image.open may return
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}


@dataclass(frozen=True)
class ValidatedImage:
    """An image that decoded fully under the pixel limit, in a format the dataset stores."""

    data: bytes
    width: int
    height: int
    format: int  # ImageFormat.JPEG or ImageFormat.PNG
    source_format: str  # what the bytes were (e.g. "WEBP" when re-encoded)


def validate_image(data: bytes, name: str, max_pixels: int) -> ValidatedImage:
    """Check `data` is a complete, decodable image of at most `max_pixels`; raise RecordRejected if not.

    The header is read first so an over-size image is refused before its pixels are allocated.
    """
    if not data:
        raise RecordRejected("image_empty", f"image {name!r} is an empty (0-byte) file")
    with warnings.catch_warnings():
        # The project's own --max-image-pixels limit applies; silence Pillow's generic bomb warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
        except Image.DecompressionBombError as e:
            raise RecordRejected("image_too_large", f"image {name!r}: {e}") from None
        except UnidentifiedImageError:
            raise RecordRejected(
                "image_unsupported",
                f"image {name!r}: bytes are not a supported image format ({', '.join(ALLOWED_FORMATS)})",
            ) from None
        except Exception as e:  # Pillow raises assorted errors on malformed headers
            raise RecordRejected(
                "image_corrupt", f"image {name!r}: unreadable header ({type(e).__name__}: {e})"
            ) from None
        with img:
            width, height = img.size
            fmt = img.format or "UNKNOWN"
            if fmt not in ALLOWED_FORMATS:
                raise RecordRejected("image_unsupported", f"image {name!r}: format {fmt} is not supported")
            if width <= 0 or height <= 0:
                raise RecordRejected("image_empty", f"image {name!r} has zero size {width}x{height}")
            if width * height > max_pixels:
                raise RecordRejected(
                    "image_too_large",
                    f"image {name!r} is {width}x{height} = {width * height} pixels > --max-image-pixels {max_pixels}",
                )
            try:
                img.load()  # full decode: truncated or corrupt pixel data fails here, not at training time
            except Exception as e:
                raise RecordRejected(
                    "image_corrupt", f"image {name!r} ({fmt}) failed to decode: {type(e).__name__}: {e}"
                ) from None
            if fmt in _KEPT_FORMATS:
                return ValidatedImage(data, width, height, _KEPT_FORMATS[fmt], fmt)
            try:
                return ValidatedImage(_reencode_png(img), width, height, ImageFormat.PNG, fmt)
            except Exception as e:
                raise RecordRejected(
                    "image_unsupported", f"image {name!r} ({fmt}) cannot be converted to PNG: {e}"
                ) from None


def _reencode_png(img: Image.Image) -> bytes:
    if img.mode not in _PNG_MODES:
        img = img.convert("RGBA" if "A" in img.getbands() else "RGB")
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False)  # deterministic bytes: same input, same PNG
    return out.getvalue()
