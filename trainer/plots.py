"""Small Pillow-only charts for the demo and the CLI: the loss curve."""

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


def loss_curve_png(
    losses: Sequence[float], path: str | Path, size: tuple[int, int] = (640, 320)
) -> Image.Image:
    """Raw (light) and smoothed (dark) loss per step on labelled axes, saved as a PNG."""
    w, h = size
    left, right, top, bottom = 56, 12, 24, 28
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (w - left - right) * (i / max(1, len(losses) - 1))
        return x, top + (h - top - bottom) * (1 - (v - lo) / span)

    draw.rectangle((left, top, w - right, h - bottom), outline=(160, 160, 160))
    for series, colour in ((losses, (170, 190, 230)), (smooth(losses), (20, 60, 160))):
        draw.line([xy(i, v) for i, v in enumerate(series)], fill=colour, width=2)
    draw.text((left, 6), f"training loss over {len(losses)} steps (smoothed in dark blue)", fill="black")
    draw.text((4, top), f"{hi:.4g}", fill="black")
    draw.text((4, h - bottom - 10), f"{lo:.4g}", fill="black")
    draw.text((left, h - bottom + 8), "step 1", fill="black")
    draw.text((w - right - 60, h - bottom + 8), f"step {len(losses)}", fill="black")
    image.save(path)
    return image
