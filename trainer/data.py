"""Training data: scan a folder of images and captions, bucket by aspect ratio, cache encodings, draw batches.

The pipeline is three steps, each checkable on its own:

1. ``load_dataset(folder, resolutions, ...)`` opens, verifies and fully decodes every image up front,
   reads its caption and assigns it an aspect bucket per target resolution. Every problem is collected
   as a ``DatasetIssue`` naming the file; policies decide whether it is skipped or raised as one
   ``DatasetError`` listing them all, so a run never dies on image 731.
2. ``build_cache(dataset, cache_dir, encode_image, encode_text, vae_id, te_id)`` encodes only the latents
   and text embeddings missing from the on-disk cache (content-addressed safetensors files) and returns
   a ``CachedDataset``. Wrap encoder factories in ``LazyEncoder`` and a warm cache never builds them.
3. ``CachedDataset.sampler(...)`` gives a ``BucketBatchSampler``: batches within one bucket, an order fixed
   by (seed, epoch), caption dropout decided in the plan, and a state_dict for exact resumption;
   ``CachedDataset.load_batch(plan)`` turns a plan into tensors.

This module knows no model: encoders come in as callables and model identities as strings.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import ZitError
from .files import atomic_write

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
MISSING_CAPTION_POLICIES = ("error", "skip", "trigger")
BAD_IMAGE_POLICIES = ("skip", "error")
SIDE_MULTIPLE = 16
PREPROCESS_ID = "exif-rgb-on-white-cover-lanczos-center-crop-v1"
"""Names the pixel preprocessing; it is part of every latent cache key, so changing it invalidates."""

Bucket = tuple[int, int]
"""An aspect bucket as (width, height) in pixels, both multiples of 16."""
Progress = Callable[[str, int, int], None]
"""progress(stage, done, total), stage being "latents" or "text"."""


class DatasetError(ZitError):
    """A dataset we refuse to train on; the message lists every problem by file."""

    def __init__(self, message: str, issues: Sequence[DatasetIssue] = ()) -> None:
        self.issues = list(issues)
        lines = [message, *(f"  {issue}" for issue in self.issues)]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class DatasetIssue:
    """One problem with one file of the dataset."""

    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass(frozen=True)
class ImageRecord:
    """A verified image: its caption, its size after EXIF orientation and the sha256 of its bytes."""

    path: Path
    caption: str
    width: int
    height: int
    sha256: str


@dataclass(frozen=True)
class Sample:
    """One image at one target resolution, with the bucket it is cropped to."""

    image: ImageRecord
    resolution: int
    bucket: Bucket


@dataclass
class Dataset:
    """A scanned folder: the usable images, their samples (image x resolution) and the issues found."""

    folder: Path
    images: list[ImageRecord]
    samples: list[Sample]
    issues: list[DatasetIssue]

    def bucket_counts(self) -> dict[Bucket, int]:
        """How many samples fall in each bucket, in bucket order."""
        counts: dict[Bucket, int] = {}
        for sample in self.samples:
            counts[sample.bucket] = counts.get(sample.bucket, 0) + 1
        return dict(sorted(counts.items()))


# ---- buckets -----------------------------------------------------------------------------------------


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


# ---- scanning ----------------------------------------------------------------------------------------


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in the folder (hidden files and folders skipped), sorted by relative path."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    images = [
        path
        for path in found
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    ]
    return sorted(images, key=lambda p: p.relative_to(folder).as_posix())


def compose_caption(caption: str, trigger: str | None) -> str:
    """Prepend the trigger word: ``"trigger, caption"``, or either alone when the other is empty."""
    parts = [part for part in ((trigger or "").strip(), caption.strip()) if part]
    return ", ".join(parts)


def read_caption(image_path: Path, caption_ext: str = ".txt") -> tuple[str | None, str | None]:
    """The caption from the image's same-name caption file, or (None, the reason it has none)."""
    txt = image_path.with_suffix(caption_ext)
    if not txt.is_file():
        return None, f"no caption file {txt.name}"
    try:
        text = txt.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError:
        return None, f"caption file {txt.name} is not UTF-8 text"
    except OSError as exc:
        return None, f"caption file {txt.name} cannot be read ({exc})"
    if not text:
        return None, f"caption file {txt.name} is empty"
    return text, None


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    """The size after applying the EXIF orientation (tags 5-8 swap width and height)."""
    orientation = image.getexif().get(0x0112, 1)
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def inspect_image(path: Path, min_side: int) -> tuple[tuple[int, int, str] | None, str | None]:
    """Open, verify and fully decode an image: ((width, height, sha256), None) or (None, problem)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"cannot be read ({exc})"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = _oriented_size(image)
    except UnidentifiedImageError:
        return None, "not a readable image (unknown format or corrupt header)"
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; each is a bad image, not a crash
        return None, f"corrupt or truncated image ({type(exc).__name__}: {exc})"
    if min(width, height) < min_side:
        return None, f"too small: {width}x{height}, shorter side below min_side={min_side}"
    return (width, height, hashlib.sha256(data).hexdigest()), None


def _validate_scan_options(missing_caption: str, bad_image: str, min_side: int) -> None:
    if missing_caption not in MISSING_CAPTION_POLICIES:
        raise ValueError(
            f"missing_caption must be one of {MISSING_CAPTION_POLICIES}, got {missing_caption!r}"
        )
    if bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_image must be one of {BAD_IMAGE_POLICIES}, got {bad_image!r}")
    if min_side < 1:
        raise ValueError(f"min_side must be >= 1, got {min_side}")


def _caption_for(
    path: Path, caption: str | None, trigger: str | None, missing_caption: str, caption_ext: str
) -> tuple[str | None, DatasetIssue | None]:
    """The final caption of an image (None: skip it) and the issue to report, if any."""
    if caption:
        return compose_caption(caption, trigger), None
    text, problem = read_caption(path, caption_ext)
    if text is not None:
        return compose_caption(text, trigger), None
    if missing_caption == "trigger":
        return compose_caption("", trigger), DatasetIssue(path, f"{problem}; using the trigger word only")
    return None, DatasetIssue(path, problem or "no caption")


def scan_images(
    folder: str | os.PathLike[str],
    *,
    recursive: bool = False,
    caption: str | None = None,
    trigger: str | None = None,
    missing_caption: str = "error",
    bad_image: str = "skip",
    min_side: int = 256,
    caption_ext: str = ".txt",
) -> tuple[list[ImageRecord], list[DatasetIssue]]:
    """Verify every image and caption of a folder; returns the usable images and all issues found.

    ``caption`` (when not empty) is used for every image and caption files are ignored; ``trigger`` is
    prepended to every caption. ``missing_caption``: "error" raises, "skip" drops the image, "trigger"
    trains it on the trigger word alone. ``bad_image`` (unreadable, corrupt, truncated, or shorter side
    below ``min_side``): "skip" drops it, "error" raises. Raised errors list every issue; skipped ones
    are logged. An empty result is a ``DatasetError`` naming the folder.
    """
    root = Path(folder)
    _validate_scan_options(missing_caption, bad_image, min_side)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    paths = list_images(root, recursive)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        checks = list(pool.map(lambda p: inspect_image(p, min_side), paths))
    images: list[ImageRecord] = []
    issues: list[DatasetIssue] = []
    fatal: list[DatasetIssue] = []
    for path, (info, problem) in zip(paths, checks, strict=True):
        text, caption_issue = _caption_for(path, caption, trigger, missing_caption, caption_ext)
        if problem is not None:
            issues.append(DatasetIssue(path, problem))
            if bad_image == "error":
                fatal.append(issues[-1])
        if caption_issue is not None:
            issues.append(caption_issue)
            if missing_caption == "error":
                fatal.append(caption_issue)
        if info is not None and text is not None:
            images.append(ImageRecord(path, text, *info))
    if fatal:
        raise DatasetError(f"dataset {root}: {len(fatal)} problem(s)", fatal)
    for issue in issues:
        log.warning("dataset: %s", issue)
    if not images:
        raise DatasetError(
            f"dataset folder {root} has no usable images ({len(paths)} image files found)", issues
        )
    return images, issues


def samples_for(
    image: ImageRecord,
    bucket_tables: dict[int, list[Bucket]],
    allow_upscale: bool = False,
) -> list[Sample]:
    """The samples of an image: one per resolution, skipping those that would need upscaling.

    Without ``allow_upscale`` a resolution is used only if the image covers its bucket without being
    enlarged; an image too small for every resolution is still used once, at the smallest one.
    """
    samples = []
    for resolution in sorted(bucket_tables):
        bucket = nearest_bucket(image.width, image.height, bucket_tables[resolution])
        if allow_upscale or cover_scale(image.width, image.height, bucket) <= 1.0:
            samples.append(Sample(image, resolution, bucket))
    if samples:
        return samples
    smallest = min(bucket_tables)
    bucket = nearest_bucket(image.width, image.height, bucket_tables[smallest])
    log.info("dataset: %s is upscaled to %dx%d", image.path, *bucket)
    return [Sample(image, smallest, bucket)]


def load_dataset(
    folder: str | os.PathLike[str],
    resolutions: Sequence[int] = (1024,),
    *,
    bucket_step: int = 64,
    max_aspect: float = 3.0,
    allow_upscale: bool = False,
    **scan_options: Any,
) -> Dataset:
    """Scan a folder (``scan_options`` as ``scan_images``'s) and bucket every image at each resolution."""
    if not resolutions:
        raise ValueError("resolutions must name at least one target resolution")
    tables = {r: make_buckets(r, bucket_step, max_aspect) for r in sorted(set(resolutions))}
    images, issues = scan_images(folder, **scan_options)
    samples = [sample for image in images for sample in samples_for(image, tables, allow_upscale)]
    return Dataset(Path(folder), images, samples, issues)


# ---- pixels ------------------------------------------------------------------------------------------


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


# ---- cache -------------------------------------------------------------------------------------------


class LazyEncoder:
    """A callable that builds its encoder from a factory on the first call, so an unused one costs nothing."""

    def __init__(self, factory: Callable[[], Callable[..., Any]]) -> None:
        self._factory = factory
        self._encoder: Callable[..., Any] | None = None

    @property
    def built(self) -> bool:
        """Whether the factory has been called (and its encoder not released)."""
        return self._encoder is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._encoder is None:
            self._encoder = self._factory()
        return self._encoder(*args, **kwargs)

    def release(self) -> None:
        """Drop the built encoder (to free its memory); a later call builds it again."""
        self._encoder = None


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def latent_key(image_sha256: str, vae_id: str, bucket: Bucket) -> str:
    """Cache key of a latent: the image bytes' hash, the VAE identity, the bucket and the preprocessing."""
    return _digest("latent", PREPROCESS_ID, vae_id, f"{bucket[0]}x{bucket[1]}", image_sha256)


def text_key(caption: str, te_id: str) -> str:
    """Cache key of a text embedding: the caption text and the text-encoder identity."""
    return _digest("text", te_id, hashlib.sha256(caption.encode("utf-8")).hexdigest())


def latent_path(cache_dir: Path, key: str) -> Path:
    """Where the latent with this key is stored."""
    return cache_dir / "latents" / f"{key}.safetensors"


def text_path(cache_dir: Path, key: str) -> Path:
    """Where the text embedding with this key is stored."""
    return cache_dir / "text" / f"{key}.safetensors"


def save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temp file in the same folder and an atomic rename."""
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def cache_entry_ok(path: Path, name: str) -> bool:
    """Whether a cache file exists, parses as safetensors and holds the tensor ``name``."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return name in handle.keys()
    except Exception:  # noqa: BLE001 - any unreadable cache file is a miss, to be rewritten
        return False


def _as_latent(output: Any, source: Path) -> torch.Tensor:
    """Check an encoder's latent (C,h,w) or (1,C,h,w) and return it as a CPU (C,h,w) tensor."""
    batched = isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[0] == 1
    if not isinstance(output, torch.Tensor) or not (output.ndim == 3 or batched):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise DatasetError(f"image encoder returned {shape} for {source}; expected (C,h,w) or (1,C,h,w)")
    latent = output[0] if output.ndim == 4 else output
    if not torch.isfinite(latent).all():
        raise DatasetError(f"image encoder returned non-finite values for {source}")
    return latent.detach().to("cpu").contiguous()


def _as_embedding(output: Any, caption: str) -> torch.Tensor:
    """Check a text embedding (L, hidden) (a leading batch of 1 is dropped) and return it on the CPU."""
    if isinstance(output, torch.Tensor) and output.ndim == 3 and output.shape[0] == 1:
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise DatasetError(
            f"text encoder returned {shape} for caption {caption[:60]!r}; expected (L, hidden)"
        )
    if not torch.isfinite(output).all():
        raise DatasetError(f"text encoder returned non-finite values for caption {caption[:60]!r}")
    return output.detach().to("cpu").contiguous()


def _require_id(name: str, value: str) -> None:
    if not value:
        raise ValueError(
            f"{name} must identify the model (a name or weights hash); it is part of the cache key"
        )


def _encode_latent(sample: Sample, encode_image: Callable[[torch.Tensor], Any]) -> torch.Tensor:
    """Read, check and encode one sample's image."""
    data = sample.image.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sample.image.sha256:
        raise DatasetError(f"{sample.image.path} changed since the dataset was scanned; scan it again")
    pixels = load_image(data, sample.bucket).unsqueeze(0)
    with torch.no_grad():
        return _as_latent(encode_image(pixels), sample.image.path)


def ensure_latents(
    samples: Sequence[Sample],
    cache_dir: Path,
    encode_image: Callable[[torch.Tensor], Any],
    vae_id: str,
    progress: Progress | None = None,
) -> list[Path]:
    """The latent cache file of each sample, encoding (1,3,H,W) [-1,1] pixels only for the missing ones."""
    _require_id("vae_id", vae_id)
    paths = [latent_path(cache_dir, latent_key(s.image.sha256, vae_id, s.bucket)) for s in samples]
    pairs = zip(paths, samples, strict=True)
    missing = {path: sample for path, sample in pairs if not cache_entry_ok(path, "latent")}
    for done, (path, sample) in enumerate(missing.items(), start=1):
        metadata = {"source": sample.image.path.name, "bucket": f"{sample.bucket[0]}x{sample.bucket[1]}"}
        save_atomic(path, {"latent": _encode_latent(sample, encode_image)}, metadata | {"vae_id": vae_id})
        if progress is not None:
            progress("latents", done, len(missing))
    return paths


def ensure_text(
    captions: Sequence[str],
    cache_dir: Path,
    encode_text: Callable[[list[str]], Sequence[Any]],
    te_id: str,
    progress: Progress | None = None,
    batch_size: int = 8,
) -> list[Path]:
    """The embedding cache file of each caption, encoding only the missing ones, ``batch_size`` at a time."""
    _require_id("te_id", te_id)
    paths = [text_path(cache_dir, text_key(caption, te_id)) for caption in captions]
    pairs = zip(paths, captions, strict=True)
    todo = list({path: caption for path, caption in pairs if not cache_entry_ok(path, "text")}.items())
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        with torch.no_grad():
            outputs = list(encode_text([caption for _, caption in chunk]))
        if len(outputs) != len(chunk):
            raise DatasetError(f"text encoder returned {len(outputs)} embeddings for {len(chunk)} captions")
        for (path, caption), output in zip(chunk, outputs, strict=True):
            save_atomic(path, {"text": _as_embedding(output, caption)}, {"caption": caption, "te_id": te_id})
        if progress is not None:
            progress("text", start + len(chunk), len(todo))
    return paths


def cached_text_embeddings(
    prompts: Sequence[str],
    cache_dir: str | os.PathLike[str],
    encode_text: Callable[[list[str]], Sequence[Any]],
    te_id: str,
) -> list[torch.Tensor]:
    """Text embeddings (L, hidden) for prompts (e.g. preview prompts), through the same cache."""
    return [load_file(path)["text"] for path in ensure_text(prompts, Path(cache_dir), encode_text, te_id)]


@dataclass(frozen=True)
class CachedSample:
    """A sample with its cache files."""

    sample: Sample
    latent_file: Path
    text_file: Path


@dataclass
class Batch:
    """Tensors of one batch: latents (B,C,h,w), text embeddings (L_i, hidden) and what they came from."""

    latents: torch.Tensor
    text_embeds: list[torch.Tensor]
    captions: list[str]
    paths: list[Path]
    bucket: Bucket


class CachedDataset:
    """A dataset whose latents and text embeddings are all on disk; batches are read from the cache."""

    def __init__(self, entries: Sequence[CachedSample], empty_text_file: Path) -> None:
        self.entries = list(entries)
        self.empty_text_file = empty_text_file

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def buckets(self) -> list[Bucket]:
        """The bucket of each entry, in entry order."""
        return [entry.sample.bucket for entry in self.entries]

    def sampler(self, batch_size: int = 1, **options: Any) -> BucketBatchSampler:
        """A resumable batch sampler over this dataset's buckets; options as ``BucketBatchSampler``'s."""
        return BucketBatchSampler(self.buckets, batch_size, **options)

    def load_batch(self, plan: BatchPlan) -> Batch:
        """Read a planned batch; captions the plan drops get the empty-caption embedding and caption ""."""
        entries = [self.entries[i] for i in plan.indices]
        if len({entry.sample.bucket for entry in entries}) != 1:
            raise ValueError(f"batch plan {plan.indices} is empty or mixes buckets")
        dropped = list(zip(entries, plan.drop_caption, strict=True))
        return Batch(
            latents=torch.stack([load_file(entry.latent_file)["latent"] for entry in entries]),
            text_embeds=[
                load_file(self.empty_text_file if drop else e.text_file)["text"] for e, drop in dropped
            ],
            captions=["" if drop else e.sample.image.caption for e, drop in dropped],
            paths=[entry.sample.image.path for entry in entries],
            bucket=entries[0].sample.bucket,
        )


def build_cache(
    dataset: Dataset,
    cache_dir: str | os.PathLike[str],
    encode_image: Callable[[torch.Tensor], Any],
    encode_text: Callable[[list[str]], Sequence[Any]],
    vae_id: str,
    te_id: str,
    progress: Progress | None = None,
) -> CachedDataset:
    """Encode what the cache lacks (latents, then captions and the empty caption) and return the dataset.

    ``encode_image`` takes (1,3,H,W) float32 pixels in [-1,1] and returns a latent (C,h,w) or (1,C,h,w);
    ``encode_text`` takes a list of captions and returns one (L, hidden) tensor each. An encoder is only
    called for cache misses: pass ``LazyEncoder(factory)`` and a warm cache never builds the model.
    Keys hash the image bytes (or caption), ``vae_id`` / ``te_id``, the bucket and the preprocessing, so
    any change to those is a miss and everything else is reused. Files are written atomically.
    """
    root = Path(cache_dir)
    latent_files = ensure_latents(dataset.samples, root, encode_image, vae_id, progress)
    captions = [sample.image.caption for sample in dataset.samples]
    *text_files, empty_file = ensure_text([*captions, ""], root, encode_text, te_id, progress)
    entries = [
        CachedSample(sample, latent, text)
        for sample, latent, text in zip(dataset.samples, latent_files, text_files, strict=True)
    ]
    return CachedDataset(entries, empty_file)


def encode_share(
    dataset: Dataset,
    cache_dir: str | os.PathLike[str],
    encode_image: Callable[[torch.Tensor], Any],
    encode_text: Callable[[list[str]], Sequence[Any]],
    vae_id: str,
    te_id: str,
    rank: int,
    world: int,
    progress: Progress | None = None,
) -> None:
    """Process `rank` of `world` encodes its share of the cache misses (every world-th sample and caption;
    process 0 also the empty caption); after a barrier `build_cache` finds everything cached."""
    root = Path(cache_dir)
    ensure_latents(dataset.samples[rank::world], root, encode_image, vae_id, progress)
    captions = sorted({sample.image.caption for sample in dataset.samples})
    ensure_text(captions[rank::world] + ([""] if rank == 0 else []), root, encode_text, te_id, progress)


# ---- sampling ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """Which entries form a batch (all in one bucket), and whose captions are dropped."""

    epoch: int
    index: int
    indices: tuple[int, ...]
    drop_caption: tuple[bool, ...]


class BucketBatchSampler:
    """Batches that never mix buckets, in an order fixed by (seed, epoch), resumable at any batch.

    An epoch: in each bucket (in sorted order) the members are shuffled once per repeat and the
    ``repeats`` shuffles concatenated (so an image meets itself in a batch only at a repeat seam), cut
    into batches (the last partial one kept unless ``drop_last``); then all batches are shuffled and
    each caption is dropped with probability ``caption_dropout``. Everything comes from a numpy
    generator seeded with (seed, epoch), so the plan of any epoch can be recomputed after a restart.
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        batch_size: int = 1,
        *,
        seed: int = 0,
        repeats: int = 1,
        drop_last: bool = False,
        caption_dropout: float = 0.0,
        shuffle: bool = True,
    ) -> None:
        _check_sampler_options(batch_size, repeats, caption_dropout)
        self.batch_size, self.seed, self.repeats = batch_size, seed, repeats
        self.drop_last, self.caption_dropout, self.shuffle = drop_last, caption_dropout, shuffle
        self._groups: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(buckets):
            self._groups.setdefault(tuple(bucket), []).append(index)
        self._groups = dict(sorted(self._groups.items()))
        self._num_samples = len(buckets)
        self.epoch, self.index = 0, 0
        self._plan: tuple[int, list[BatchPlan]] | None = None
        if len(self) == 0:
            raise DatasetError(
                f"no batches: with drop_last every bucket has fewer than batch_size={batch_size} samples "
                f"(bucket sizes {[len(g) * repeats for g in self._groups.values()]})"
            )

    def __len__(self) -> int:
        """Batches per epoch."""
        round_ = math.floor if self.drop_last else math.ceil
        return sum(round_(len(group) * self.repeats / self.batch_size) for group in self._groups.values())

    def fingerprint(self) -> str:
        """A hash of the data layout and settings; a saved state only fits a sampler with the same one."""
        layout = repr((self._num_samples, list(self._groups.items())))
        settings = (
            self.batch_size,
            self.seed,
            self.repeats,
            self.drop_last,
            self.caption_dropout,
            self.shuffle,
        )
        return _digest(layout, repr(settings))[:16]

    def plan_epoch(self, epoch: int) -> list[BatchPlan]:
        """All batches of an epoch, in order; a pure function of the settings and the epoch."""
        rng = np.random.default_rng([self.seed % 2**64, epoch])
        chunks: list[list[int]] = []
        for group in self._groups.values():
            rounds = [rng.permutation(group) if self.shuffle else group for _ in range(self.repeats)]
            order = [int(i) for members in rounds for i in members]
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    chunks.append(chunk)
        if self.shuffle:
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        drops = [rng.random(len(chunk)) < self.caption_dropout for chunk in chunks]
        return [
            BatchPlan(epoch, i, tuple(chunk), tuple(bool(d) for d in drop))
            for i, (chunk, drop) in enumerate(zip(chunks, drops, strict=True))
        ]

    def _epoch_plan(self, epoch: int) -> list[BatchPlan]:
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self.plan_epoch(epoch))
        return self._plan[1]

    def next_batch(self) -> BatchPlan:
        """The next batch plan, moving on to the next epoch after the last batch of this one."""
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
        plan = self._epoch_plan(self.epoch)[self.index]
        self.index += 1
        return plan

    def __iter__(self) -> Iterator[BatchPlan]:
        """Endless batch plans from the current position (stop by step count)."""
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, batches already drawn in it) and the fingerprint it belongs to."""
        return {"epoch": self.epoch, "index": self.index, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore a position; strict refuses a state of other data or settings, else the index is clamped."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if strict and state.get("fingerprint") != self.fingerprint():
            raise ValueError(
                "sampler state was saved with different data or sampler settings "
                f"(fingerprint {state.get('fingerprint')} != {self.fingerprint()}); resume with strict=False "
                "to continue in a new order"
            )
        if strict and not 0 <= index <= len(self):
            raise ValueError(f"sampler index {index} outside 0..{len(self)}")
        self.epoch, self.index = max(epoch, 0), min(max(index, 0), len(self))


def _check_sampler_options(batch_size: int, repeats: int, caption_dropout: float) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
