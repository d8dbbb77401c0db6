import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from kimi_mm import ImageInputError, KimiMMImageProcessor, smart_resize

from .conftest import shapes_image


@pytest.fixture()
def ip() -> KimiMMImageProcessor:
    return KimiMMImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224)


@pytest.mark.parametrize("size", [(4, 4), (30, 500), (500, 30), (224, 224), (1000, 700), (57, 113), (3000, 20)])
def test_smart_resize_keeps_budget_multiples_and_aspect(size):
    h, w = size
    rh, rw = smart_resize(h, w, 28, 56 * 56, 224 * 224)
    assert rh % 28 == 0 and rw % 28 == 0
    assert rh * rw <= 224 * 224
    if h * w >= 56 * 56 and max(h, w) / min(h, w) < 8:
        assert abs(math.log((rh / rw) / (h / w))) < 0.35  # aspect ratio kept up to rounding to 28 px


def test_native_resolution_image_is_not_resized(ip):
    out = ip(shapes_image(112, 84))  # both sides already multiples of 28, inside the budget
    assert out["image_grid_thw"].tolist() == [[1, 6, 8]]


def test_patches_are_row_major_channel_first(ip):
    image = shapes_image(56, 56, seed=3)
    out = ip(image, return_tensors="pt")
    pixels = (np.asarray(image, dtype=np.float32) / 255.0 - 0.5) / 0.5  # [H, W, C]
    # patch (row 1, col 2) of the 4x4 grid
    expected = pixels[14:28, 28:42].transpose(2, 0, 1).reshape(-1)
    assert out["pixel_values"].shape == (16, 3 * 14 * 14)
    torch.testing.assert_close(out["pixel_values"][1 * 4 + 2], torch.from_numpy(expected))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(ip, mode):
    image = shapes_image(60, 60).convert(mode)
    out = ip(image)
    assert out["pixel_values"].shape[1] == 3 * 14 * 14
    assert np.isfinite(out["pixel_values"]).all()


def test_transparent_pixels_become_white(ip):
    image = Image.new("RGBA", (56, 56), (255, 0, 0, 0))
    out = ip(image)
    assert np.allclose(out["pixel_values"], 1.0)  # white, normalised with mean=std=0.5


def test_paths_bytes_arrays_and_pil_agree(ip, tmp_path):
    image = shapes_image(70, 50, seed=1)
    path = tmp_path / "x.png"
    image.save(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    reference = ip(image)["pixel_values"]
    for source in (str(path), path, buffer.getvalue(), np.asarray(image)):
        np.testing.assert_array_equal(ip(source)["pixel_values"], reference)


def test_batch_concatenates_patches_and_reports_grids(ip):
    out = ip([shapes_image(56, 56), [shapes_image(112, 56)]], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]
    assert out["pixel_values"].shape[0] == 16 + 32


def test_missing_file_is_named(ip, tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageInputError, match="nope.png.*not found"):
        ip([shapes_image(56, 56), str(missing)])


def test_corrupt_bytes_are_refused(ip, tmp_path):
    with pytest.raises(ImageInputError, match="image 0: not a readable image"):
        ip(b"\x89PNG\r\n\x1a\n definitely not a png")
    bad = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    shapes_image(200, 200).save(buffer, format="PNG")
    bad.write_bytes(buffer.getvalue()[:300])  # valid header, truncated data
    with pytest.raises(ImageInputError, match="truncated.png"):
        ip(str(bad))


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(path)  # 144M pixels, a few KB on disk
    with pytest.raises(ImageInputError, match="bomb.png.*12000x12000.*decompression bomb"):
        KimiMMImageProcessor()(str(path))


def test_tiny_and_extreme_images_are_refused(ip):
    with pytest.raises(ImageInputError, match="image 0: 1x1 is too small"):
        ip(Image.new("RGB", (1, 1)))
    with pytest.raises(ImageInputError, match="aspect ratio"):
        ip(Image.new("RGB", (4000, 8)))


def test_token_count_without_processing_matches_processing(ip):
    for h, w in [(56, 56), (100, 37), (480, 640), (5, 900), (1000, 1000)]:
        grid = ip(Image.new("RGB", (w, h)))["image_grid_thw"][0]
        assert ip.get_number_of_image_patches(h, w) == grid[1] * grid[2]


def test_saves_and_loads(ip, tmp_path):
    from transformers import AutoImageProcessor

    ip.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, KimiMMImageProcessor)
    assert (loaded.min_pixels, loaded.max_pixels) == (56 * 56, 224 * 224)
    assert loaded.size == {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}
