"""Pillow charts written by every run (loss.png): the loss curve and turbo health on labelled axes, with
tick labels, grid lines and a legend; plus the debiased EMA that the charts, the CLI and TensorBoard share."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SMOOTHING = 0.9
INK, GRID, FRAME, PAPER = (25, 25, 25), (228, 228, 228), (120, 120, 120), (255, 255, 255)
RAW, SMOOTHED, HEALTH, WARNING = (165, 188, 232), (20, 60, 160), (30, 120, 60), (200, 40, 40)
# plot-area margins: left holds the y tick labels and the rotated y-axis title, bottom the x ticks and title
LEFT, RIGHT, TOP, BOTTOM = 86, 24, 52, 56


class Smoother:
    """Streaming exponential moving average with bias correction (TensorBoard's smoothing slider)."""

    def __init__(self, weight: float = SMOOTHING):
        self.weight, self._avg, self._n = weight, 0.0, 0

    def __call__(self, value: float) -> float:
        """Add one value; returns the smoothed value so far."""
        self._n += 1
        self._avg = self.weight * self._avg + (1 - self.weight) * value
        return self._avg / (1 - self.weight**self._n)


def smooth(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction (what TensorBoard's smoothing slider shows)."""
    smoother = Smoother(weight)
    return [smoother(v) for v in values]


@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.ImageFont:
    """Pillow's built-in font at `size` px (its small bitmap font on a Pillow older than 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """About `count` round values (steps of 1, 2, 2.5 or 5 x 10^k) inside [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    nice = ((1.5, 1), (2.25, 2), (3.5, 2.5), (7.5, 5))  # (below this multiple of 10^k, use this step)
    step = next((m * power for limit, m in nice if raw / power < limit), 10 * power)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def tick_label(value: float, step: float) -> str:
    """A tick label with as many decimals as the tick spacing needs."""
    if abs(value) >= 1e5 or (value and abs(value) < 1e-3):
        return f"{value:.3g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    if step > 0 and not math.isclose(round(step, decimals), step):  # 2.5 x 10^k
        decimals += 1
    return f"{value:.{decimals}f}"


@dataclass(frozen=True)
class Axes:
    """A plot area in pixels and the data ranges it shows."""

    left: int
    top: int
    right: int
    bottom: int
    x0: float
    x1: float
    y0: float
    y1: float

    def xy(self, x: float, y: float) -> tuple[float, float]:
        """The pixel of a data point (y clamped to the plot area)."""
        fx = (x - self.x0) / ((self.x1 - self.x0) or 1.0)
        fy = min(1.0, max(0.0, (y - self.y0) / ((self.y1 - self.y0) or 1.0)))
        return self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top)


def _vertical_text(image: Image.Image, centre: tuple[float, float], text: str, size: int) -> None:
    """Text rotated 90 degrees (reading upwards) centred on `centre`: a y-axis title."""
    f = font(size)
    box = f.getbbox(text)
    strip = Image.new("L", (box[2] + 4, box[3] + 4), 0)
    ImageDraw.Draw(strip).text((2, 2), text, font=f, fill=255)
    strip = strip.rotate(90, expand=True)
    at = (round(centre[0] - strip.width / 2), round(centre[1] - strip.height / 2))
    image.paste(Image.new("RGB", strip.size, INK), at, strip)


def draw_axes(image: Image.Image, ax: Axes, title: str, x_title: str, y_title: str,
              integer_x: bool = True) -> None:
    """Frame, grid lines, tick labels on both axes, the axis titles and the chart title."""
    draw, small = ImageDraw.Draw(image), font(13)
    draw.rectangle((ax.left, ax.top, ax.right, ax.bottom), fill=PAPER)
    y_ticks = nice_ticks(ax.y0, ax.y1, 6)
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 0.0
    for v in y_ticks:
        _, y = ax.xy(ax.x0, v)
        draw.line((ax.left, y, ax.right, y), fill=GRID)
        draw.line((ax.left - 5, y, ax.left, y), fill=FRAME)
        draw.text((ax.left - 8, y), tick_label(v, y_step), font=small, fill=INK, anchor="rm")
    x_ticks = [t for t in nice_ticks(ax.x0, ax.x1, 8) if not integer_x or t == int(t)]
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 0.0
    for v in x_ticks:
        x, _ = ax.xy(v, ax.y0)
        draw.line((x, ax.top, x, ax.bottom), fill=GRID)
        draw.line((x, ax.bottom, x, ax.bottom + 5), fill=FRAME)
        draw.text((x, ax.bottom + 8), tick_label(v, x_step), font=small, fill=INK, anchor="mt")
    draw.rectangle((ax.left, ax.top, ax.right, ax.bottom), outline=FRAME)
    draw.text(((ax.left + ax.right) / 2, ax.bottom + 30), x_title, font=font(14), fill=INK, anchor="mt")
    _vertical_text(image, (18, (ax.top + ax.bottom) / 2), y_title, 14)
    draw.text((ax.left, ax.top - 26), title, font=font(17), fill=INK, anchor="ls")


def draw_legend(image: Image.Image, ax: Axes, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> None:
    """One row above the plot area's right end: a line sample and a label per entry."""
    draw, f = ImageDraw.Draw(image), font(13)
    x, y = ax.right, ax.top - 10
    for text, colour in reversed(entries):
        x -= int(f.getlength(text))
        draw.text((x, y), text, font=f, fill=INK, anchor="lm")
        draw.line((x - 28, y, x - 6, y), fill=colour, width=3)
        x -= 46


def _loss_range(losses: Sequence[float]) -> tuple[float, float]:
    """The y range: the losses without their rarest 1% at either end (spikes would flatten the curve; the
    smoothed curve lies inside the raw range), padded 5%."""
    ordered = sorted(losses)
    cut = len(ordered) // 100
    kept = ordered[cut:len(ordered) - cut]
    lo, hi = kept[0], kept[-1]
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    return lo - pad, hi + pad


def loss_curve_png(
    losses: Sequence[float], path: str | Path, size: tuple[int, int] = (820, 380), *,
    health: Sequence[tuple[int, float]] = (), threshold: float | None = None, scale: str = "",
    first_step: int = 1,
) -> Image.Image:
    """Raw (light) and smoothed (dark) loss per step, saved as a PNG; with `health` ((step, value) pairs)
    a second chart below shows turbo health and its warning `threshold` in red. `losses[0]` is the loss of
    step `first_step` (a resumed run's first step); `size` is one chart's (width, height)."""
    if not losses:
        raise ValueError("loss_curve_png: no losses to plot")
    w, h = size
    image = Image.new("RGB", (w, h * (2 if health else 1)), PAPER)
    draw = ImageDraw.Draw(image)
    last = first_step + len(losses) - 1
    x0 = min([first_step, *(s for s, _ in health)])
    x1 = max([last, *(s for s, _ in health)])
    x1 = x1 if x1 > x0 else x0 + 1
    smoothed = smooth(losses)
    ax = Axes(LEFT, TOP, w - RIGHT, h - BOTTOM, x0, x1, *_loss_range(losses))
    draw_axes(image, ax, f"Training loss, steps {first_step}-{last}", "optimizer step", "loss (per step)")
    steps = range(first_step, last + 1)
    for series, colour, width in ((losses, RAW, 1), (smoothed, SMOOTHED, 2)):
        points = [ax.xy(s, v) for s, v in zip(steps, series, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=width)
        else:
            (x, y), = points
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    draw_legend(image, ax, [("loss of each step", RAW),
                            (f"smoothed (EMA {SMOOTHING:g}, debiased)", SMOOTHED)])
    if health:
        _health_chart(image, Axes(LEFT, h + TOP, w - RIGHT, 2 * h - BOTTOM, x0, x1, 0, 1), health,
                      threshold, scale)
    image.save(path)
    return image


def _health_chart(image: Image.Image, frame: Axes, health: Sequence[tuple[int, float]],
                  threshold: float | None, scale: str) -> None:
    """The turbo-health chart: measured values (dots and line) and the warning threshold (red)."""
    values = [v for _, v in health] + ([threshold] if threshold is not None else []) + [1.0]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or 0.1
    ax = Axes(frame.left, frame.top, frame.right, frame.bottom, frame.x0, frame.x1,
              max(0.0, lo - pad), hi + pad)
    title = "Turbo health" + (f" ({scale})" if scale else "")
    draw_axes(image, ax, title, "optimizer step", "turbo health")
    draw = ImageDraw.Draw(image)
    legend = [("turbo health", HEALTH)]
    if threshold is not None:
        draw.line([ax.xy(ax.x0, threshold), ax.xy(ax.x1, threshold)], fill=WARNING, width=2)
        legend.append((f"warning above {threshold:g}", WARNING))
    points = [ax.xy(s, v) for s, v in health]
    if len(points) > 1:
        draw.line(points, fill=HEALTH, width=2)
    for x, y in points:
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=HEALTH)
    draw_legend(image, ax, legend)
