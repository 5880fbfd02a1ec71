"""Aspect buckets (trainer.data.buckets): the bucket sets' properties, the nearest bucket by aspect, option
checks, and multi-resolution samples that never upscale unless allowed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _data_helpers import make_pair, scan
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from trainer import data as D


@settings(max_examples=30, deadline=None)
@given(st.integers(4, 80).map(lambda k: 16 * k), st.sampled_from([16, 32, 64]), st.floats(1.0, 4.0))
def test_bucket_properties(resolution: int, step: int, max_aspect: float) -> None:
    assume(resolution >= step)
    buckets = D.make_buckets(resolution, step, max_aspect)
    assert buckets == D.make_buckets(resolution, step, max_aspect)
    assert buckets, "at least the near-square bucket"
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0 and w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        assert max(w, h) / min(w, h) <= max_aspect
        assert (h, w) in buckets
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_bucket_choice_by_aspect() -> None:
    buckets = D.make_buckets(1024, 64)
    assert (1024, 1024) in buckets
    assert D.nearest_bucket(3000, 3000, buckets) == (1024, 1024)
    w, h = D.nearest_bucket(2000, 1000, buckets)
    assert abs(w / h - 2.0) < 0.1 and w > h
    w, h = D.nearest_bucket(900, 1600, buckets)
    assert abs(w / h - 900 / 1600) < 0.05
    assert D.nearest_bucket(100, 10000, buckets) == buckets[0]


def test_bucket_options_validated() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        D.make_buckets(512, 24)
    with pytest.raises(ValueError, match="resolution"):
        D.make_buckets(32, 64)


def test_multi_resolution_samples_no_upscale(tmp_path: Path) -> None:
    make_pair(tmp_path, "big", (128, 96), "b")
    make_pair(tmp_path, "small", (40, 40), "s")
    dataset = scan(tmp_path, resolutions=(64, 96, 128))
    got = {(s.image.path.name, s.resolution) for s in dataset.samples}
    assert got == {("big.png", 64), ("big.png", 96), ("small.png", 64)}
    for sample in dataset.samples:
        assert sample.bucket[0] * sample.bucket[1] <= sample.resolution**2
    upscaled = scan(tmp_path, resolutions=(64, 96, 128), allow_upscale=True)
    assert len(upscaled.samples) == 6
    assert sum(dataset.bucket_counts().values()) == 3
