"""InternVL's reference image preprocessing, kept as a test oracle only.

`find_closest_aspect_ratio` and `dynamic_preprocess` follow InternVL's chat example
(InternVL2/2.5 model cards, `load_image`) statement for statement; the project's own code must
agree with them, so do not "improve" them. torchvision is not a dependency, so `build_transform`
reimplements `T.Resize(BICUBIC)`, `T.ToTensor()` and `T.Normalize` with PIL and numpy, in the same
float32 arithmetic torchvision uses (uint8 -> float32 / 255, then (x - mean) / std).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(input_size):
    """PIL image -> float32 numpy array [3, input_size, input_size], ImageNet-normalised."""
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)

    def transform(img):
        img = img.convert("RGB") if img.mode != "RGB" else img  # T.Lambda
        img = img.resize((input_size, input_size), Image.BICUBIC)  # T.Resize((s, s), BICUBIC) on PIL
        x = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)  # ToTensor
        return (x - mean) / std  # Normalize

    return transform


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def target_ratios_for(min_num, max_num):
    """The candidate grids exactly as `dynamic_preprocess` builds them (a set sorted by area)."""
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height

    # calculate the existing image aspect ratio
    target_ratios = target_ratios_for(min_num, max_num)

    # find the closest aspect ratio to the target
    target_aspect_ratio = find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size)

    # calculate the target width and height
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]

    # resize the image
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size
        )
        # split the image
        split_img = resized_img.crop(box)
        processed_images.append(split_img)
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        thumbnail_img = image.resize((image_size, image_size))
        processed_images.append(thumbnail_img)
    return processed_images


def load_image(image_bytes, input_size=448, max_num=12, min_num=1):
    """InternVL's `load_image` on encoded bytes: float32 numpy [n, 3, input_size, input_size]."""
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    transform = build_transform(input_size=input_size)
    images = dynamic_preprocess(image, min_num=min_num, max_num=max_num, image_size=input_size,
                                use_thumbnail=True)
    return np.stack([transform(image) for image in images])
