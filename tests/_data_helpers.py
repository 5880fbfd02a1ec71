"""What the dataset tests (test_data*.py) share: image and caption files written on the fly, and the scan
with the small-image defaults (min_side 16, bucket step 16, one 64 px resolution)."""

from __future__ import annotations

from pathlib import Path

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
