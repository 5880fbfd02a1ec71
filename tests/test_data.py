"""Tests of the dataset scanner, buckets, pixel loading, encoding cache and the resumable batch sampler."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from trainer import data as D

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (120, 60, 200)]


def make_image(
    path: Path, size: tuple[int, int], color: tuple[int, ...] = (128, 64, 32), **save: object
) -> Path:
    mode = "RGBA" if len(color) == 4 else "RGB"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def make_pair(folder: Path, stem: str, size: tuple[int, int], caption: str | None, ext: str = ".png") -> Path:
    color = COLORS[sum(map(ord, stem)) % len(COLORS)]
    path = make_image(folder / f"{stem}{ext}", size, color)
    if caption is not None:
        (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return path


def scan(folder: Path, **kw: object) -> D.Dataset:
    options: dict[str, object] = {"min_side": 16, "bucket_step": 16}
    options.update(kw)
    return D.load_dataset(folder, options.pop("resolutions", (64,)), **options)  # type: ignore[arg-type]


# ---- captions ------------------------------------------------------------------------------------------


def test_captions_trigger_and_single_caption(tmp_path: Path) -> None:
    make_pair(tmp_path, "a", (64, 64), "a red square\n")
    make_pair(tmp_path, "b", (64, 64), "a green square", ext=".jpg")
    got = {r.path.name: r.caption for r in scan(tmp_path).images}
    assert got == {"a.png": "a red square", "b.jpg": "a green square"}
    got = {r.path.name: r.caption for r in scan(tmp_path, trigger="zxq").images}
    assert got == {"a.png": "zxq, a red square", "b.jpg": "zxq, a green square"}
    got = {r.path.name: r.caption for r in scan(tmp_path, caption="photo", trigger="zxq").images}
    assert got == {"a.png": "zxq, photo", "b.jpg": "zxq, photo"}
    got = {r.path.name: r.caption for r in scan(tmp_path, caption="", trigger="").images}
    assert got == {"a.png": "a red square", "b.jpg": "a green square"}


def test_caption_extension(tmp_path: Path) -> None:
    make_pair(tmp_path, "a", (64, 64), "from txt")
    (tmp_path / "a.caption").write_text("from caption file")
    assert scan(tmp_path, caption_ext=".caption").images[0].caption == "from caption file"


def test_missing_caption_policies(tmp_path: Path) -> None:
    make_pair(tmp_path, "with", (64, 64), "has one")
    make_pair(tmp_path, "without", (64, 64), None)
    make_pair(tmp_path, "blank", (64, 64), "   \n")
    with pytest.raises(D.DatasetError, match=r"without\.png.*no caption file without\.txt") as info:
        scan(tmp_path)
    assert {i.path.name for i in info.value.issues} == {"without.png", "blank.png"}
    assert "blank.txt is empty" in str(info.value)
    skipped = scan(tmp_path, missing_caption="skip")
    assert [r.path.name for r in skipped.images] == ["with.png"]
    assert {i.path.name for i in skipped.issues} == {"without.png", "blank.png"}
    triggered = scan(tmp_path, missing_caption="trigger", trigger="zxq")
    assert {r.path.name: r.caption for r in triggered.images} == {
        "blank.png": "zxq",
        "with.png": "zxq, has one",
        "without.png": "zxq",
    }


def test_non_utf8_caption_reported(tmp_path: Path) -> None:
    make_pair(tmp_path, "x", (64, 64), None)
    (tmp_path / "x.txt").write_bytes(b"\xff\xfe\xfa caption")
    with pytest.raises(D.DatasetError, match=r"x\.txt is not UTF-8"):
        scan(tmp_path)


def test_options_validated(tmp_path: Path) -> None:
    make_pair(tmp_path, "a", (64, 64), "x")
    with pytest.raises(ValueError, match="missing_caption"):
        scan(tmp_path, missing_caption="ignore")
    with pytest.raises(ValueError, match="bad_image"):
        scan(tmp_path, bad_image="warn")
    with pytest.raises(ValueError, match="resolutions"):
        scan(tmp_path, resolutions=())


# ---- bad images ----------------------------------------------------------------------------------------


def bad_folder(tmp_path: Path) -> Path:
    make_pair(tmp_path, "good", (64, 64), "fine")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    (tmp_path / "garbage.txt").write_text("x")
    buffer = io.BytesIO()
    Image.effect_noise((96, 96), 40).convert("RGB").save(buffer, "JPEG", quality=95)
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "truncated.txt").write_text("x")
    Image.effect_noise((64, 64), 40).convert("RGB").save(buffer := io.BytesIO(), "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:-200])
    (tmp_path / "cut.txt").write_text("x")
    make_pair(tmp_path, "tiny", (64, 12), "x")
    return tmp_path


def test_bad_images_skipped_and_reported_by_name(tmp_path: Path) -> None:
    dataset = scan(bad_folder(tmp_path))
    assert [r.path.name for r in dataset.images] == ["good.png"]
    problems = {i.path.name: i.problem for i in dataset.issues}
    assert set(problems) == {"garbage.png", "truncated.jpg", "cut.png", "tiny.png"}
    assert "not a readable image" in problems["garbage.png"]
    assert "truncated" in problems["truncated.jpg"]
    assert "truncated" in problems["cut.png"]
    assert "too small: 64x12" in problems["tiny.png"]


def test_bad_images_error_policy_lists_all(tmp_path: Path) -> None:
    with pytest.raises(D.DatasetError) as info:
        scan(bad_folder(tmp_path), bad_image="error")
    message = str(info.value)
    for name in ("garbage.png", "truncated.jpg", "cut.png", "tiny.png"):
        assert name in message
    assert "good.png" not in message


def test_empty_dataset_names_folder(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"nope")
    with pytest.raises(D.DatasetError, match=f"{tmp_path}.*no usable images"):
        scan(tmp_path, missing_caption="trigger")
    with pytest.raises(D.DatasetError, match="does not exist"):
        scan(tmp_path / "missing")


def test_recursive_hidden_and_extensions(tmp_path: Path) -> None:
    make_pair(tmp_path, "top", (64, 64), "t", ext=".PNG")
    make_pair(tmp_path / "sub", "deep", (64, 64), "d", ext=".webp")
    make_pair(tmp_path / ".hidden", "secret", (64, 64), "s")
    make_pair(tmp_path, "bitmap", (64, 64), "b", ext=".bmp")
    (tmp_path / "notes.gif").write_bytes(b"GIF89a")
    assert [r.path.name for r in scan(tmp_path).images] == ["bitmap.bmp", "top.PNG"]
    assert [r.path.name for r in scan(tmp_path, recursive=True).images] == [
        "bitmap.bmp",
        "deep.webp",
        "top.PNG",
    ]


def test_exif_orientation_swaps_size(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    make_image(tmp_path / "rot.jpg", (80, 48), exif=exif)
    (tmp_path / "rot.txt").write_text("rotated")
    record = scan(tmp_path).images[0]
    assert (record.width, record.height) == (48, 80)
    pixels = D.load_image((tmp_path / "rot.jpg").read_bytes(), (48, 80))
    assert pixels.shape == (3, 80, 48)


# ---- buckets --------------------------------------------------------------------------------------------


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


# ---- sampler --------------------------------------------------------------------------------------------

BUCKETS = [(64, 64)] * 5 + [(80, 48)] * 3 + [(48, 80)] * 1


def flatten(plans: list[D.BatchPlan]) -> list[int]:
    return [i for plan in plans for i in plan.indices]


def test_batches_never_mix_buckets_and_cover_each_sample() -> None:
    sampler = D.BucketBatchSampler(BUCKETS, 2, seed=3)
    plans = sampler.plan_epoch(0)
    assert len(plans) == len(sampler) == 3 + 2 + 1
    for plan in plans:
        assert len({BUCKETS[i] for i in plan.indices}) == 1
    assert sorted(flatten(plans)) == list(range(len(BUCKETS)))


def test_drop_last_and_repeats() -> None:
    sampler = D.BucketBatchSampler(BUCKETS, 2, seed=0, repeats=3, drop_last=True)
    plans = sampler.plan_epoch(0)
    assert all(len(p.indices) == 2 for p in plans)
    assert len(plans) == len(sampler) == 15 // 2 + 9 // 2 + 3 // 2
    kept = D.BucketBatchSampler(BUCKETS, 2, seed=0, repeats=3)
    assert Counter(flatten(kept.plan_epoch(0))) == {i: 3 for i in range(len(BUCKETS))}
    with pytest.raises(D.DatasetError, match="batch_size=8"):
        D.BucketBatchSampler(BUCKETS, 8, drop_last=True)


def test_repeats_never_pair_an_image_with_itself_inside_a_round() -> None:
    sampler = D.BucketBatchSampler([(64, 64)] * 6, 3, seed=1, repeats=4)
    for plan in sampler.plan_epoch(0):
        assert len(set(plan.indices)) == 3


def test_order_deterministic_from_seed_and_epoch() -> None:
    a = D.BucketBatchSampler(BUCKETS, 2, seed=7)
    b = D.BucketBatchSampler(BUCKETS, 2, seed=7)
    c = D.BucketBatchSampler(BUCKETS, 2, seed=8)
    assert a.plan_epoch(0) == b.plan_epoch(0)
    assert a.plan_epoch(0) != c.plan_epoch(0)
    assert a.plan_epoch(0) != a.plan_epoch(1)
    ordered = D.BucketBatchSampler(BUCKETS, 2, shuffle=False)
    assert flatten(ordered.plan_epoch(0)) == [8, 0, 1, 2, 3, 4, 5, 6, 7]  # buckets in sorted order


def test_state_restore_gives_same_continuation() -> None:
    sampler = D.BucketBatchSampler(BUCKETS, 2, seed=5, repeats=2, caption_dropout=0.3)
    for _ in range(9):
        sampler.next_batch()
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(20)]
    resumed = D.BucketBatchSampler(BUCKETS, 2, seed=5, repeats=2, caption_dropout=0.3)
    resumed.load_state_dict(dict(state))
    assert [resumed.next_batch() for _ in range(20)] == expected
    assert expected[-1].epoch >= 2


def test_state_from_other_settings_refused_unless_not_strict() -> None:
    state = D.BucketBatchSampler(BUCKETS, 2, seed=5).state_dict() | {"index": 4}
    other = D.BucketBatchSampler(BUCKETS[:-1], 2, seed=5)
    with pytest.raises(ValueError, match="fingerprint"):
        other.load_state_dict(state)
    other.load_state_dict(state | {"index": 99}, strict=False)
    assert other.index == len(other)
    other.next_batch()
    assert (other.epoch, other.index) == (1, 1)


def test_caption_dropout_rate() -> None:
    sampler = D.BucketBatchSampler([(64, 64)] * 100, 4, seed=2, caption_dropout=0.25)
    drops = [d for epoch in range(10) for plan in sampler.plan_epoch(epoch) for d in plan.drop_caption]
    assert sum(drops) / len(drops) == pytest.approx(0.25, abs=0.03)
    assert not any(d for p in D.BucketBatchSampler(BUCKETS, 2).plan_epoch(0) for d in p.drop_caption)


def test_sampler_options_validated() -> None:
    for kw in ({"batch_size": 0}, {"repeats": 0}, {"caption_dropout": 1.5}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            D.BucketBatchSampler(BUCKETS, **kw)  # type: ignore[arg-type]


# ---- cache ---------------------------------------------------------------------------------------------


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
