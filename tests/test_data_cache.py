"""The encoding cache (trainer.data.cache): miss then hit with batches from it, lazy encoders, invalidation
by content, encoder and resolution, corrupt files re-encoded, the cached empty caption, batches stacked per
bucket, encoder outputs checked and named, images changed after the scan refused, and cached prompt
embeddings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _data_helpers import make_image, make_pair, scan

from trainer import data as D


class Encoders:
    """Counting fake encoders: the latent is an 8x average pool of the pixels, the text a tagged block."""

    def __init__(self) -> None:
        self.images: list[tuple[int, ...]] = []
        self.texts: list[str] = []

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.ndim == 4 and pixels.shape[0] == 1 and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1
        self.images.append(tuple(pixels.shape))
        return torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)[:, :4]

    def text(self, prompts: list[str]) -> list[torch.Tensor]:
        self.texts.extend(prompts)
        return [torch.full((len(p) + 1, 8), float(len(p))) for p in prompts]


def never(*_: object) -> object:
    raise AssertionError("an encoder was built although everything is cached")


def cache_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    make_pair(folder, "a", (64, 64), "alpha")
    make_pair(folder, "b", (96, 64), "beta")
    make_pair(folder, "c", (64, 96), "gamma")
    return folder


def build(folder: Path, cache: Path, enc: Encoders, vae: str = "vae-1", te: str = "te-1", **kw: object):
    return D.build_cache(scan(folder, **kw), cache, enc.image, enc.text, vae, te)


def test_cache_miss_then_hit_and_batches(tmp_path: Path) -> None:
    folder, cache = cache_folder(tmp_path), tmp_path / "cache"
    enc = Encoders()
    cold = build(folder, cache, enc)
    assert len(enc.images) == 3 and sorted(enc.texts) == ["", "alpha", "beta", "gamma"]
    events: list[tuple[str, int, int]] = []
    warm = D.build_cache(
        scan(folder),
        cache,
        D.LazyEncoder(never),
        D.LazyEncoder(never),
        "vae-1",
        "te-1",
        progress=lambda *e: events.append(e),
    )
    assert events == []
    assert [e.latent_file for e in warm.entries] == [e.latent_file for e in cold.entries]
    assert not list(cache.rglob("*.tmp"))
    plan = D.BatchPlan(0, 0, (1,), (False,))
    batch = warm.load_batch(plan)
    assert batch.latents.shape == (1, 4, batch.bucket[1] // 8, batch.bucket[0] // 8)
    assert batch.captions == ["beta"] and batch.paths[0].name == "b.png"
    assert batch.text_embeds[0].shape == (5, 8)
    with pytest.raises(ValueError, match="mixes buckets"):
        warm.load_batch(D.BatchPlan(0, 0, (0, 1), (False, False)))


def test_lazy_encoder_builds_once_on_first_call() -> None:
    built: list[int] = []

    def factory():
        built.append(1)
        return lambda x: x * 2

    lazy = D.LazyEncoder(factory)
    assert not lazy.built
    assert lazy(3) == 6 and lazy(4) == 8 and built == [1]
    lazy.release()
    assert not lazy.built


def test_cache_invalidation(tmp_path: Path) -> None:
    folder, cache = cache_folder(tmp_path), tmp_path / "cache"
    build(folder, cache, Encoders())
    make_image(folder / "a.png", (64, 64), (1, 2, 3))
    (folder / "b.txt").write_text("beta two")
    enc = Encoders()
    build(folder, cache, enc)
    assert enc.images == [(1, 3, 64, 64)] and enc.texts == ["beta two"]
    enc = Encoders()
    build(folder, cache, enc, vae="vae-2")
    assert len(enc.images) == 3 and enc.texts == []
    enc = Encoders()
    build(folder, cache, enc, te="te-2")
    assert enc.images == [] and sorted(enc.texts) == ["", "alpha", "beta two", "gamma"]
    enc = Encoders()
    build(folder, cache, enc, resolutions=(48,))
    assert len(enc.images) == 3 and enc.texts == []


def test_corrupt_cache_file_is_reencoded(tmp_path: Path) -> None:
    folder, cache = cache_folder(tmp_path), tmp_path / "cache"
    first = build(folder, cache, Encoders())
    first.entries[0].latent_file.write_bytes(b"\x00" * 10)
    enc = Encoders()
    build(folder, cache, enc)
    assert len(enc.images) == 1


def test_caption_dropout_uses_cached_empty_embedding(tmp_path: Path) -> None:
    folder, cache = cache_folder(tmp_path), tmp_path / "cache"
    dataset = build(folder, cache, Encoders())
    batch = dataset.load_batch(D.BatchPlan(0, 0, (0,), (True,)))
    assert batch.captions == [""]
    assert torch.equal(batch.text_embeds[0], torch.zeros(1, 8))


def test_sampled_batches_stack_within_bucket(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    for i in range(4):
        make_pair(folder, f"sq{i}", (64, 64), f"square {i}")
    make_pair(folder, "wide", (96, 64), "wide")
    dataset = D.build_cache(scan(folder), tmp_path / "cache", Encoders().image, Encoders().text, "v", "t")
    sampler = dataset.sampler(batch_size=3, seed=1)
    for _ in range(len(sampler)):
        batch = dataset.load_batch(sampler.next_batch())
        assert batch.latents.shape[0] == len(batch.captions) == len(batch.text_embeds)
        assert batch.latents.shape[2:] == (batch.bucket[1] // 8, batch.bucket[0] // 8)


def test_encoder_output_checked_and_named(tmp_path: Path) -> None:
    folder = cache_folder(tmp_path)
    dataset = scan(folder)
    enc = Encoders()
    with pytest.raises(D.DatasetError, match=r"a\.png"):
        D.build_cache(
            dataset, tmp_path / "c1", lambda x: torch.full((1, 4, 8, 8), float("nan")), enc.text, "v", "t"
        )
    with pytest.raises(D.DatasetError, match=r"expected \(C,h,w\)"):
        D.build_cache(dataset, tmp_path / "c2", lambda x: torch.zeros(2, 4, 8, 8), enc.text, "v", "t")
    with pytest.raises(D.DatasetError, match="3 embeddings for 4 captions"):
        D.build_cache(dataset, tmp_path / "c3", enc.image, lambda p: enc.text(p)[:-1], "v", "t")
    with pytest.raises(ValueError, match="vae_id"):
        D.build_cache(dataset, tmp_path / "c4", enc.image, enc.text, "", "t")


def test_image_changed_after_scan_is_refused(tmp_path: Path) -> None:
    folder = cache_folder(tmp_path)
    dataset = scan(folder)
    make_image(folder / "c.png", (64, 96), (9, 9, 9))
    with pytest.raises(D.DatasetError, match=r"c\.png changed since"):
        D.build_cache(dataset, tmp_path / "cache", Encoders().image, Encoders().text, "v", "t")


def test_cached_text_embeddings_for_prompts(tmp_path: Path) -> None:
    enc = Encoders()
    first = D.cached_text_embeddings(["a cat", "a dog"], tmp_path, enc.text, "te")
    again = D.cached_text_embeddings(["a dog"], tmp_path, D.LazyEncoder(never), "te")
    assert [t.shape for t in first] == [(6, 8), (6, 8)]
    assert torch.equal(again[0], first[1]) and enc.texts == ["a cat", "a dog"]
