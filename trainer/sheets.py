"""Labelled picture sheets: preview grids (a title, one column per prompt, one row per sampler setting) and
the demo's before/after stack. All label drawing lives here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (32, 32, 32)
TEXT = (235, 235, 235)
MUTED = (190, 190, 190)
MIN_COLUMN = 120  # labelled columns are at least this wide, so a prompt wraps into a few lines, not letters
MAX_LINES = 4  # a longer prompt is cut with an ellipsis


@lru_cache(maxsize=4)
def font(size: int = 11) -> ImageFont.ImageFont:
    """Pillow's built-in font at `size` px (the fixed bitmap font on a Pillow older than 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def line_height(f: ImageFont.ImageFont) -> int:
    """Pixels from one text line to the next."""
    top, bottom = f.getbbox("Ag,|")[1::2]
    return max(bottom, bottom - top) + 3


def text_width(text: str, f: ImageFont.ImageFont) -> int:
    """Pixel width of `text` in `f`."""
    return int(f.getlength(text))


def wrap(text: str, f: ImageFont.ImageFont, width: int, max_lines: int = MAX_LINES) -> list[str]:
    """`text` broken into lines no wider than `width` (words, then letters), at most `max_lines`."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(f"{lines[-1]} {word}", f) <= width:
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while text_width(word, f) > width and len(word) > 1:
            cut = 1
            while cut < len(word) and text_width(word[:cut + 1], f) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and text_width(lines[-1] + "…", f) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "…"
    return lines


@dataclass(frozen=True)
class SheetLayout:
    """Where everything of a labelled grid goes: the picture size, each cell's top-left corner (rows of
    columns) and each text line as (top-left corner, text, font size, colour)."""

    size: tuple[int, int]
    cells: list[list[tuple[int, int]]]
    texts: list[tuple[tuple[int, int], str, int, tuple[int, int, int]]]


def sheet_layout(n_rows: int, n_cols: int, cell: tuple[int, int], *, title: str = "",
                 row_labels: Sequence[str] = (), col_labels: Sequence[str] = (), pad: int = 2) -> SheetLayout:
    """The layout of `n_rows` x `n_cols` cells of size `cell`: a title band, a band of column labels (each
    wrapped to its column) and a label strip above each row; without labels, a plain padded grid."""
    w, h = cell
    small, big = font(11), font(13)
    col_w = max(w, MIN_COLUMN) if col_labels else w
    width = n_cols * (col_w + pad) + pad
    texts: list[tuple[tuple[int, int], str, int, tuple[int, int, int]]] = []
    y = pad
    if title:
        for line in wrap(title, big, width - 2 * pad - 4):
            texts.append(((pad + 4, y + 2), line, 13, TEXT))
            y += line_height(big)
        y += 4
    if col_labels:
        wrapped = [wrap(label, small, col_w - 4) for label in col_labels]
        for j, lines in enumerate(wrapped):
            for k, line in enumerate(lines):
                texts.append(((pad + j * (col_w + pad) + 2, y + k * line_height(small)), line, 11, MUTED))
        y += max(len(lines) for lines in wrapped) * line_height(small) + 2
    cells = []
    for i in range(n_rows):
        if row_labels:
            texts.append(((pad + 4, y + 1), row_labels[i] if i < len(row_labels) else "", 11, TEXT))
            y += line_height(small) + 2
        cells.append([(pad + j * (col_w + pad) + (col_w - w) // 2, y) for j in range(n_cols)])
        y += h + pad
    return SheetLayout((width, y), cells, [t for t in texts if t[1]])


def labelled_grid(rows: Sequence[Sequence[Image.Image]], *, title: str = "", row_labels: Sequence[str] = (),
                  col_labels: Sequence[str] = (), pad: int = 2) -> Image.Image:
    """Rows of equal-size images pasted into one picture, with `title` on top, `col_labels` (e.g. the
    prompts) above the columns and `row_labels` (e.g. the sampler settings) above each row."""
    layout = sheet_layout(len(rows), max(len(r) for r in rows), rows[0][0].size, title=title,
                          row_labels=row_labels, col_labels=col_labels, pad=pad)
    out = Image.new("RGB", layout.size, BACKGROUND)
    for row, corners in zip(rows, layout.cells, strict=False):
        for image, corner in zip(row, corners, strict=False):
            out.paste(image, corner)
    draw = ImageDraw.Draw(out)
    for corner, text, size, colour in layout.texts:
        draw.text(corner, text, fill=colour, font=font(size))
    return out


def stack(sheets: Sequence[Image.Image], titles: Sequence[str], pad: int = 4) -> Image.Image:
    """Pictures one above the other, each under its title in a band of the larger font (the demo's
    before/after sheet)."""
    f = font(15)
    width = max(s.width for s in sheets) + 2 * pad
    lines = [wrap(title, f, width - 2 * pad - 8) for title in titles]
    bands = [len(t) * line_height(f) + 6 for t in lines]
    height = sum(s.height + b + pad for s, b in zip(sheets, bands, strict=True)) + pad
    out = Image.new("RGB", (width, height), BACKGROUND)
    draw, y = ImageDraw.Draw(out), pad
    for sheet, title, band in zip(sheets, lines, bands, strict=True):
        for k, line in enumerate(title):
            draw.text((pad + 4, y + 3 + k * line_height(f)), line, fill=TEXT, font=f)
        out.paste(sheet, (pad, y + band))
        y += band + sheet.height + pad
    return out
