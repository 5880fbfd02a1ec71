"""The dataset scanner (trainer.data.scan / records): captions (trigger, fixed caption, extension, missing or
non-UTF-8 files), bad images skipped or refused and named, an empty or missing folder, which files count
(recursion, hidden folders, extensions) and the scan's options.

Buckets, pixel loading, the batch sampler and the encoding cache have their own test_data_*.py files.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from _data_helpers import make_pair, scan
from PIL import Image

from trainer import data as D

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


# ---- which files count --------------------------------------------------------------------------------


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
