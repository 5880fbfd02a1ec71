"""Pixel loading (trainer.data.pixels): EXIF orientation (in the scanned size and the pixels), the centred
cover crop to the requested size with values in [-1, 1], transparency composited on white, and 16-bit
grayscale scaled.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from _data_helpers import make_image, scan
from PIL import Image

from trainer import data as D


def test_exif_orientation_swaps_size(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    make_image(tmp_path / "rot.jpg", (80, 48), exif=exif)
    (tmp_path / "rot.txt").write_text("rotated")
    record = scan(tmp_path).images[0]
    assert (record.width, record.height) == (48, 80)
    pixels = D.load_image((tmp_path / "rot.jpg").read_bytes(), (48, 80))
    assert pixels.shape == (3, 80, 48)


def test_load_image_cover_crop_center_and_range(tmp_path: Path) -> None:
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (50, 0, 150, 100))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    pixels = D.load_image(buffer.getvalue(), (96, 96))
    assert pixels.shape == (3, 96, 96) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels[:, :, 4:-4].mean().item() > 0.99  # the white middle survives the crop


def test_transparency_composited_on_white(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(buffer, "PNG")
    assert torch.allclose(D.load_image(buffer.getvalue(), (32, 32)), torch.ones(3, 32, 32))


def test_sixteen_bit_grayscale_scaled(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("I;16", (32, 32), 32768).save(buffer, "PNG")
    pixels = D.load_image(buffer.getvalue(), (32, 32))
    assert pixels.mean().item() == pytest.approx(127 / 127.5 - 1, abs=0.01)
