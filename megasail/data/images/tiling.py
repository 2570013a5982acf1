"""InternVL dynamic tiling: which tile grid an image gets and how many LLM tokens it becomes.

Every component that needs an image's token count (preprocessing, the reader, the packer, both
decoders) calls these functions, so a count never disagrees with what a decoder produces.
"""

from __future__ import annotations

from functools import lru_cache

from megasail.models.config import ModelConfig

# From the model config's defaults (InternViT-300M-448px + pixel-shuffle projector): a 448px tile,
# patch 14 -> 32x32 patches, pixel shuffle 0.5 -> 16x16 = 256 tokens. Datasets store images as one
# slot that the reader expands with TOKENS_PER_TILE context tokens per tile.
TILE_SIZE = ModelConfig().vision.image_size
TOKENS_PER_TILE = ModelConfig().tokens_per_tile
# InternVL's `load_image(max_num=12)`: the one default tile budget of preprocessing, training and inference
DEFAULT_MAX_TILES = 12
IMAGE_WRAPPER_TOKENS = 2  # <img> ... </img> around each image's context tokens


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, in InternVL's order (by area).

    Built exactly as InternVL builds it (a set sorted by area), because ties in the aspect-ratio
    search are broken by this order.
    """
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def tile_grid(width: int, height: int, max_tiles: int, min_tiles: int = 1, tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """(cols, rows) of the tile grid InternVL picks for a width x height image.

    The grid whose aspect ratio is closest to the image's wins; on a tie the later grid in area
    order wins when the image's area exceeds half of that grid's pixel area.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, max_tiles: int, min_tiles: int = 1, tile_size: int = TILE_SIZE,
              use_thumbnail: bool = True) -> int:
    """Tiles the decoder emits for this image: the grid, plus a thumbnail when the grid has more than one."""
    cols, rows = tile_grid(width, height, max_tiles, min_tiles, tile_size)
    n = cols * rows
    return n + 1 if (use_thumbnail and n > 1) else n


def num_image_tokens(width: int, height: int, max_tiles: int, min_tiles: int = 1, tile_size: int = TILE_SIZE,
                     use_thumbnail: bool = True, tokens_per_tile: int = TOKENS_PER_TILE,
                     include_wrapper: bool = True) -> int:
    """LLM tokens one image occupies: 256 <IMG_CONTEXT> per tile, plus <img> and </img> by default."""
    tiles = num_tiles(width, height, max_tiles, min_tiles, tile_size, use_thumbnail)
    return tiles * tokens_per_tile + (IMAGE_WRAPPER_TOKENS if include_wrapper else 0)
