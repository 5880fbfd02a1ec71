"""Small Pillow-only charts for the demo and the CLI: the loss curve and turbo health."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (what TensorBoard's smoothing slider shows)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _frame(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, lo: float, hi: float,
           first: int, last: int) -> None:
    left, top, right, bottom = box
    draw.rectangle(box, outline=(160, 160, 160))
    draw.text((left, top - 18), title, fill="black")
    draw.text((4, top), f"{hi:.4g}", fill="black")
    draw.text((4, bottom - 10), f"{lo:.4g}", fill="black")
    draw.text((left, bottom + 6), f"step {first}", fill="black")
    draw.text((right - 60, bottom + 6), f"step {last}", fill="black")


def loss_curve_png(
    losses: Sequence[float], path: str | Path, size: tuple[int, int] = (640, 320), *,
    health: Sequence[tuple[int, float]] = (), threshold: float | None = None, scale: str = "",
) -> Image.Image:
    """Raw (light) and smoothed (dark) loss per step on labelled axes, saved as a PNG; with `health`
    ((step, value) pairs) a second chart below shows turbo health and its warning `threshold` in red."""
    w, h = size
    left, right, top, bottom = 56, 12, 24, 28
    panel = h
    image = Image.new("RGB", (w, h + (panel if health else 0)), "white")
    draw = ImageDraw.Draw(image)
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (w - left - right) * (i / max(1, len(losses) - 1))
        return x, top + (h - top - bottom) * (1 - (v - lo) / span)

    for series, colour in ((losses, (170, 190, 230)), (smooth(losses), (20, 60, 160))):
        draw.line([xy(i, v) for i, v in enumerate(series)], fill=colour, width=2)
    _frame(draw, (left, top, w - right, h - bottom), f"training loss over {len(losses)} steps "
           "(smoothed in dark blue)", lo, hi, 1, len(losses))
    if health:
        values = [v for _, v in health] + ([threshold] if threshold is not None else [])
        hlo, hhi = min(values + [1.0]), max(values + [1.0])
        hspan = (hhi - hlo) or 1.0
        y0, y1 = h + top, h + panel - bottom
        last = max(len(losses), max(s for s, _ in health), 1)

        def hxy(step: int, v: float) -> tuple[float, float]:
            return left + (w - left - right) * step / last, y0 + (y1 - y0) * (1 - (v - hlo) / hspan)

        if threshold is not None:
            draw.line([hxy(0, threshold), hxy(last, threshold)], fill=(200, 40, 40), width=1)
        points = [hxy(s, v) for s, v in health]
        if len(points) > 1:
            draw.line(points, fill=(30, 120, 60), width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(30, 120, 60))
        _frame(draw, (left, y0, w - right, y1), f"turbo health ({scale}; red: warning above "
               f"{threshold:g})" if threshold is not None else f"turbo health ({scale})", hlo, hhi, 0, last)
    image.save(path)
    return image
