"""Scanning a dataset folder: verify every image and caption, collect issues, assign buckets."""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .buckets import Bucket, cover_scale, make_buckets, nearest_bucket
from .records import Dataset, DatasetError, DatasetIssue, ImageRecord, Sample

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
MISSING_CAPTION_POLICIES = ("error", "skip", "trigger")
BAD_IMAGE_POLICIES = ("skip", "error")


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
