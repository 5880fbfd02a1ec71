"""Aspect buckets: the (width, height) shapes a target resolution offers and the one an image goes to."""

from __future__ import annotations

import math
from collections.abc import Sequence

SIDE_MULTIPLE = 16

Bucket = tuple[int, int]
"""An aspect bucket as (width, height) in pixels, both multiples of 16."""


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 3.0) -> list[Bucket]:
    """The aspect buckets of a target resolution: deterministic, symmetric, sorted by aspect ratio.

    The pixel budget is ``resolution**2``. For each width w = step, 2*step, ... up to the square, the
    height is the largest multiple of ``step`` with w * h <= budget; the pair is kept when its aspect
    ratio is at most ``max_aspect``, and its transpose (h, w) is added; the largest square always is.
    Sides are multiples of ``step``, itself a multiple of 16 (VAE 8 x patch 2). A coarser step gives
    fewer buckets, so batches fill up.
    """
    _check_bucket_options(resolution, step, max_aspect)
    budget = resolution * resolution
    square = resolution // step * step
    found: set[Bucket] = {(square, square)}
    width = step
    while width * width <= budget:
        height = budget // width // step * step
        if height / width <= max_aspect:
            found.update({(width, height), (height, width)})
        width += step
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def _check_bucket_options(resolution: int, step: int, max_aspect: float) -> None:
    if step <= 0 or step % SIDE_MULTIPLE:
        raise ValueError(f"bucket step must be a positive multiple of {SIDE_MULTIPLE}, got {step}")
    if resolution < step:
        raise ValueError(f"resolution must be >= the bucket step {step}, got {resolution}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (in log ratio); ties go to the larger area."""
    if not buckets:
        raise ValueError("no buckets to choose from")
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def cover_scale(width: int, height: int, bucket: Bucket) -> float:
    """The resize factor that makes the image cover the bucket (> 1 means upscaling)."""
    return max(bucket[0] / width, bucket[1] / height)
