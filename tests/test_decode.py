"""megasail.data.images.decode: PIL against InternVL's reference, DALI against PIL, bad-input policy, bench smoke."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import internvl_reference as ref  # tests/ is on sys.path (tests/conftest.py)
import numpy as np
import pytest
import skimage
import torch
from PIL import Image, ImageDraw

from megasail.data.images import dali, decode
from megasail.data.images.decode import BACKEND_ENV_VAR, DecodeStats, ImageDecodeError, decode_tiles
from megasail.data.images.tiling import num_tiles

REPO = Path(__file__).resolve().parents[1]
SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
needs_dali = pytest.mark.skipif(not dali.dali_available(), reason="nvidia-dali is not installed")
MEAN_C11 = np.asarray(ref.IMAGENET_MEAN, dtype=np.float64).reshape(3, 1, 1)
STD_C11 = np.asarray(ref.IMAGENET_STD, dtype=np.float64).reshape(3, 1, 1)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def skimage_bytes(name: str) -> bytes:
    return (SKIMAGE_DATA / name).read_bytes()


def gradient_noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 60 * np.sin(x / 17.0)], -1)
    pixels = pixels + rng.normal(0, 10, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def text_page(width: int, height: int, seed: int = 0) -> Image.Image:
    """Dark strokes in lines on white: the content class of document scans."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (248, 248, 245))
    draw = ImageDraw.Draw(image)
    for top in range(20, height - 20, 24):
        for left in range(20, width - 30, 14):
            if rng.random() < 0.8:
                draw.line([(left, top), (left + int(rng.integers(3, 10)), top + int(rng.integers(6, 14)))],
                          fill=(20, 20, 30), width=2)
    return image


def unnormalize(tiles: torch.Tensor) -> np.ndarray:
    """float32 [n, 3, T, T] normalised -> float64 pixel values in 0..1."""
    return tiles.cpu().numpy().astype(np.float64) * STD_C11 + MEAN_C11


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A valid 1x1 PNG whose IHDR claims width x height: refused unless something decodes pixels."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR chunk CRC
    return bytes(data)


REAL_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "page.png"]


def inputs_for_reference():
    """(name, encoded bytes): real photos, a scanned page, synthetic images and odd pixel modes."""
    cases = [(name, skimage_bytes(name)) for name in REAL_PHOTOS]
    rgb = gradient_noise(700, 300)
    cases += [
        ("synthetic JPEG", encode(rgb, "JPEG", quality=90)),
        ("synthetic PNG exact grid 896x448", encode(gradient_noise(896, 448, 1), "PNG")),
        ("RGBA PNG", encode(rgb.convert("RGBA"), "PNG")),
        ("grayscale JPEG", encode(rgb.convert("L"), "JPEG")),
        ("palette PNG", encode(rgb.convert("P", palette=Image.ADAPTIVE), "PNG")),
        ("CMYK JPEG", encode(rgb.convert("CMYK"), "JPEG")),
        ("1x1 PNG", encode(Image.new("RGB", (1, 1), (200, 10, 30)), "PNG")),
        ("thin 3000x20 PNG", encode(gradient_noise(3000, 20), "PNG")),
    ]
    return cases


@pytest.mark.parametrize(("name", "data"), inputs_for_reference(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("max_tiles", [1, 6])
def test_pil_matches_internvl_reference(name, data, max_tiles):
    expected = ref.load_image(data, max_num=max_tiles)
    (tiles,) = decode_tiles([data], max_tiles, backend="pil")
    assert tiles.dtype == torch.float32
    assert tuple(tiles.shape) == expected.shape
    with Image.open(io.BytesIO(data)) as image:
        assert tiles.shape[0] == num_tiles(image.width, image.height, max_tiles)
    np.testing.assert_allclose(tiles.numpy(), expected, rtol=0, atol=1e-5)


@needs_dali
@pytest.mark.parametrize(("name", "data", "max_tiles"), [
    ("rocket.jpg", skimage_bytes("rocket.jpg"), 6),
    ("astronaut.png", skimage_bytes("astronaut.png"), 4),
    ("page.png (document)", skimage_bytes("page.png"), 6),
    ("text page JPEG", encode(text_page(1240, 1754), "JPEG", quality=90), 12),
    ("synthetic PNG", encode(gradient_noise(900, 500), "PNG"), 6),
], ids=lambda v: v if isinstance(v, str) else "")
def test_dali_agrees_with_pil(name, data, max_tiles):
    pil_tiles, = decode_tiles([data], max_tiles, backend="pil")
    dali_tiles, = decode_tiles([data], max_tiles, backend="dali")
    assert dali_tiles.shape == pil_tiles.shape and dali_tiles.dtype == torch.float32
    mad = np.abs(unnormalize(dali_tiles) - unnormalize(pil_tiles)).mean(axis=(1, 2, 3))
    assert mad.max() < 2 / 255, mad * 255  # per tile, so a misplaced tile cannot hide in the average


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_tiles_are_row_major_then_thumbnail(backend):
    """A 3x2 grid of solid colours at exactly the grid size: tile k must be colour k."""
    cols, rows, t = 3, 2, 448
    colours = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20], [20, 230, 230], [130, 60, 200]])
    pixels = np.zeros((rows * t, cols * t, 3), np.uint8)
    for k, colour in enumerate(colours):
        r, c = divmod(k, cols)
        pixels[r * t:(r + 1) * t, c * t:(c + 1) * t] = colour
    (tiles,) = decode_tiles([encode(Image.fromarray(pixels), "PNG")], 6, backend=backend)
    assert tiles.shape == (7, 3, t, t)
    values = unnormalize(tiles) * 255
    for k, colour in enumerate(colours):
        np.testing.assert_allclose(values[k].mean(axis=(1, 2)), colour, atol=0.5)
        r, c = divmod(k, cols)  # the thumbnail shows the same block, scaled down
        np.testing.assert_allclose(values[6][:, int((r + 0.5) * t / rows), int((c + 0.5) * t / cols)], colour, atol=2)


def bad_batch():
    good_jpeg = encode(gradient_noise(640, 480), "JPEG", quality=90)
    good_png = skimage_bytes("coffee.png")
    truncated_jpeg = good_jpeg[: len(good_jpeg) * 6 // 10]  # header intact, scan data cut
    return [good_jpeg, truncated_jpeg, png_bomb(), b"<html>not an image</html>", good_png]


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_bad_images_are_skipped_and_counted(backend):
    batch = bad_batch()
    stats = DecodeStats()
    results = decode_tiles(batch, 6, backend=backend, stats=stats)
    assert [r is None for r in results] == [False, True, True, True, False]
    assert (stats.decoded, stats.corrupt, stats.too_large) == (2, 2, 1)
    assert stats.tiles == results[0].shape[0] + results[4].shape[0] == 7 + 7
    # The truncated JPEG was inside the DALI batch; the good images still came from DALI.
    assert stats.backend_counts == {"pil" if backend == "pil" else "dali_cpu": 2}
    for index in (0, 4):  # per tile, so two swapped tiles cannot hide in an average
        expected = unnormalize(torch.from_numpy(ref.load_image(batch[index], max_num=6)))
        per_tile = np.abs(unnormalize(results[index]) - expected).mean(axis=(1, 2, 3))
        assert per_tile.max() < (1e-6 if backend == "pil" else 2 / 255), per_tile * 255

    again = decode_tiles(batch[:1] + batch[4:], 6, backend=backend, stats=stats)  # pipeline still usable
    assert all(r is not None for r in again) and stats.decoded == 4


def assert_tiles_match_pil(tiles: torch.Tensor, data: bytes, max_tiles: int) -> None:
    """Each tile within 2/255 (mean absolute, pixel units) of PIL's tile at the same position."""
    (expected,) = decode_tiles([data], max_tiles, backend="pil")
    assert tiles.shape == expected.shape
    per_tile = np.abs(unnormalize(tiles) - unnormalize(expected)).mean(axis=(1, 2, 3))
    assert per_tile.max() < 2 / 255, per_tile * 255


@needs_dali
@pytest.mark.parametrize("into_out", [False, True], ids=["tensors", "out"])
def test_image_failing_inside_a_dali_batch_is_retried_image_by_image(monkeypatch, into_out):
    """A truncated JPEG whose header is intact passes the header check, reaches DALI and fails its
    batch; the batch is decoded again one image at a time, and the good images' tiles come back in
    their own slots, each tile within 2/255 of PIL's.

    Fails if the failed batch drops its good images (no per-image retry), if the retry swaps two tiles
    of an image or two images' slots, if the bad image is counted as decoded, or if the image never
    reaches DALI (refused earlier, so the retry is not what the test exercises)."""
    good_a = encode(gradient_noise(900, 500, 3), "JPEG", quality=92)  # 2x1 grid + thumbnail
    good_b = encode(gradient_noise(400, 700, 4), "PNG")  # 1x2 grid + thumbnail
    truncated = good_a[: len(good_a) * 6 // 10]
    assert decode.read_header(truncated).format == "JPEG"  # the header check lets it through
    calls = []
    real_decode_batch = dali.DaliTiler.decode_batch

    def counting_decode_batch(self, images, *args, **kwargs):
        calls.append(len(images))
        return real_decode_batch(self, images, *args, **kwargs)

    monkeypatch.setattr(dali.DaliTiler, "decode_batch", counting_decode_batch)
    batch = [good_a, truncated, good_b]
    stats = DecodeStats()
    out = torch.full((3 + 3 + 3, 3, 448, 448), -7.0) if into_out else None
    results = decode_tiles(batch, 6, backend="dali", stats=stats, out=out, out_tiles=[3, 3, 3] if into_out else None)
    assert calls == [3, 1, 1, 1]  # the whole batch failed in DALI, then each image alone
    assert results[1] is None
    assert (stats.decoded, stats.corrupt, stats.backend_counts) == (2, 1, {"dali_cpu": 2})
    assert_tiles_match_pil(results[0], good_a, 6)
    assert_tiles_match_pil(results[2], good_b, 6)
    if into_out:
        assert_tiles_match_pil(out[:3], good_a, 6)
        assert_tiles_match_pil(out[6:], good_b, 6)
        assert bool((out[3:6] == -7.0).all())  # the bad image's slice is left to the caller


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_on_error_raise_names_index_and_reason(backend):
    batch = bad_batch()
    with pytest.raises(ImageDecodeError, match=r"image 1: corrupt") as info:
        decode_tiles(batch, 6, backend=backend, on_error="raise")
    assert (info.value.index, info.value.kind) == (1, "corrupt")
    # 1e8 pixels: above the default limit, below PIL's own ceiling (2x Image.MAX_IMAGE_PIXELS), so ours decides.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not leak out either
        with pytest.raises(ImageDecodeError, match=r"image 0: too_large: 10000x10000 = 100000000 pixels"):
            decode_tiles([png_bomb(10000, 10000)], 6, backend=backend, on_error="raise")
    with pytest.raises(ImageDecodeError, match=r"image 0: too_large"):  # above PIL's ceiling
        decode_tiles([png_bomb()], 6, backend=backend, on_error="raise")


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_out_gives_the_same_tiles_bit_for_bit(backend):
    """decode_tiles(out=buf) writes each image into its slice of buf, equal to the tensors it returns without out."""
    batch = [data for _, data in inputs_for_reference()]
    expected = decode_tiles(batch, 6, backend=backend)
    counts = [t.shape[0] for t in expected]
    buf = torch.full((sum(counts), 3, 448, 448), float("nan"))
    stats = DecodeStats()
    got = decode_tiles(batch, 6, backend=backend, out=buf, stats=stats)
    assert torch.equal(buf, torch.cat(expected))
    at = 0
    for tiles, n in zip(got, counts, strict=True):
        assert tiles.data_ptr() == buf[at].data_ptr() and tiles.shape[0] == n  # a view of buf, no copy
        at += n
    assert (stats.decoded, stats.tiles) == (len(batch), sum(counts))


@pytest.mark.parametrize("backend", ["pil", pytest.param("dali", marks=needs_dali)])
def test_out_leaves_bad_images_slices_to_the_caller(backend):
    batch = bad_batch()
    alone = decode_tiles(batch, 6, backend=backend)
    counts = [7, 7, 1, 1, 7]  # the refused images' counts come from out_tiles (e.g. the dataset index)
    buf = torch.full((sum(counts), 3, 448, 448), -7.0)
    stats = DecodeStats()
    got = decode_tiles(batch, 6, backend=backend, out=buf, out_tiles=counts, stats=stats)
    assert [r is None for r in got] == [False, True, True, True, False]
    assert (stats.decoded, stats.corrupt, stats.too_large) == (2, 2, 1)
    assert torch.equal(buf[:7], alone[0]) and torch.equal(buf[16:], alone[4])
    assert bool((buf[7:16] == -7.0).all())  # untouched
    with pytest.raises(ValueError, match="unreadable header"):  # no out_tiles: the layout is unknown
        decode_tiles(batch, 6, backend=backend, out=buf)
    with pytest.raises(ImageDecodeError, match="image 0: corrupt: its 640x480 header gives 7 tiles, out_tiles says 3"):
        decode_tiles(batch[:1], 6, backend=backend, out=buf[:3], out_tiles=[3], on_error="raise")
    with pytest.raises(ValueError, match="out holds 8"):
        decode_tiles(batch[:1], 6, backend=backend, out=buf[:8])


def test_pixel_limit_is_explicit_not_pils_global(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # users often switch PIL's guard off
    stats = DecodeStats()
    assert decode_tiles([png_bomb(20000, 20000)], 6, backend="pil", stats=stats) == [None]
    assert stats.too_large == 1
    small = encode(gradient_noise(100, 60), "PNG")
    assert decode_tiles([small], 6, backend="pil", max_image_pixels=100 * 60 - 1, stats=stats) == [None]
    assert decode_tiles([small], 6, backend="pil", max_image_pixels=100 * 60, stats=stats)[0] is not None
    assert (stats.too_large, stats.decoded) == (2, 1)


@needs_dali
def test_auto_chooses_per_image_by_size_and_env_overrides(monkeypatch):
    side = int(decode.AUTO_DALI_MIN_PIXELS["JPEG"] ** 0.5) + 1
    large = encode(Image.new("RGB", (side, side), (90, 140, 200)), "JPEG", quality=85)
    small = skimage_bytes("rocket.jpg")
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    stats = DecodeStats()
    results = decode_tiles([small, large], 1, stats=stats)
    assert [r.shape[0] for r in results] == [1, 1]
    assert stats.backend_counts == {"pil": 1, "dali_cpu": 1}

    monkeypatch.setenv(BACKEND_ENV_VAR, "pil")
    stats = DecodeStats()
    decode_tiles([small, large], 1, stats=stats)
    assert stats.backend_counts == {"pil": 2}
    monkeypatch.setenv(BACKEND_ENV_VAR, "nvjpeg")
    with pytest.raises(ValueError, match="MEGASAIL_DECODE_BACKEND"):
        decode_tiles([small], 1)


def test_missing_dali_gives_clear_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(dali, "fn", None)
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    with pytest.raises(ImportError, match="nvidia-dali"):
        decode_tiles([skimage_bytes("rocket.jpg")], 1, backend="dali")
    stats = DecodeStats()
    decode_tiles([skimage_bytes("rocket.jpg")], 1, backend="auto", stats=stats)
    assert stats.backend_counts == {"pil": 1}


def test_backend_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(decode, "_logged", set())
    data = [skimage_bytes("rocket.jpg")]
    with caplog.at_level(logging.INFO, logger="megasail.data.images.decode"):
        decode_tiles(data, 1, backend="pil")
        decode_tiles(data, 1, backend="pil")
    assert [r.getMessage() for r in caplog.records] == ["image decode backend: pil"]


@pytest.mark.gpu
@pytest.mark.skipif(dali.dali_gpu_count() == 0, reason="needs a GPU visible to DALI")
def test_dali_mixed_agrees_with_pil_on_gpu():
    data = skimage_bytes("rocket.jpg")
    stats = DecodeStats()
    (gpu_tiles,) = decode_tiles([data], 6, backend="dali", stats=stats)
    assert gpu_tiles.is_cuda and stats.backend_counts == {"dali_mixed": 1}
    assert_tiles_match_pil(gpu_tiles, data, 6)  # per tile


def test_bench_images_quick_runs(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_images.py"), "--quick", "--max-tiles", "1,12",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [[cell.strip() for cell in line.strip("|").split("|")]
             for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    backends = ["pil", "dali", "auto"] if dali.dali_available() else ["pil", "auto"]
    expected = sorted((images, mt, b) for images in ("photo JPEG", "photo PNG", "document JPEG", "document PNG")
                      for mt in ("1", "12") for b in backends)
    assert sorted((cells[0], cells[2], cells[3].split(" ")[0]) for cells in table) == expected
    rows = json.loads(out.read_text())
    assert len(rows) == len(table) and all(r["tiles_per_s"] > 0 for r in rows)


def test_formats_outside_the_allowlist_are_refused_from_the_header():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, format="PPM")  # PIL reads PPM, datasets never hold it
    stats = DecodeStats()
    assert decode_tiles([buf.getvalue()], 1, backend="pil", stats=stats) == [None]
    assert stats.corrupt == 1
