"""What a scan produces: the dataset's records, its issues and the error that lists them."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ZitError
from .buckets import Bucket


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


def digest(*parts: str) -> str:
    """The sha256 hex digest of the parts joined by NUL (cache keys and sampler fingerprints)."""
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()
