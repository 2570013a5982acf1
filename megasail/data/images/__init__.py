"""Images: InternVL dynamic tiling and tile decoding (PIL reference, DALI CPU and GPU)."""
