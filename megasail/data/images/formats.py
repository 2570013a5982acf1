"""Image formats and size caps shared by preprocessing and the decoders (Pillow's format names)."""

from __future__ import annotations

# The only formats Pillow may open: no EPS (Ghostscript), PSD, ... plugins run on crawled bytes.
# JPEG's opener also yields MPO (multi-picture JPEG, still a JPEG stream).
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# 8192 x 8192: above any real photo or 600-dpi A4 scan (4960 x 7016), far below a decoded bomb's RAM.
DEFAULT_MAX_IMAGE_PIXELS = 1 << 26
DEFAULT_MAX_IMAGE_BYTES = 64 << 20  # one encoded image file or webdataset member
