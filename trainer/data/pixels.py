"""Pixel preprocessing: image bytes -> a bucket-sized (3, H, W) tensor in [-1, 1]."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import Bucket, cover_scale

PREPROCESS_ID = "exif-rgb-on-white-cover-lanczos-center-crop-v1"
"""Names the pixel preprocessing; it is part of every latent cache key, so changing it invalidates."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited over white and 16-bit grayscale scaled to 8 bits."""
    if image.mode.startswith("I;16") or image.mode == "I":
        scaled = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(scaled, "L")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def fit_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Resize to cover the bucket (Lanczos, aspect kept) and center-crop to exactly its size."""
    width, height = bucket
    scale = cover_scale(image.width, image.height, bucket)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


def load_image(data: bytes, bucket: Bucket) -> torch.Tensor:
    """Decode image bytes into a (3, height, width) float32 tensor in [-1, 1] fitted to the bucket."""
    with Image.open(io.BytesIO(data)) as raw:
        image = _to_rgb(ImageOps.exif_transpose(raw))
    pixels = np.asarray(fit_to_bucket(image, bucket), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
