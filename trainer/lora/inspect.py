"""Per-module statistics of a ZIT LoRA (norm and effective rank of dW), as a text table and a heatmap."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..plots import font, nice_ticks
from .canonical import Lora, LoraError
from .merge import factor_svdvals
from .spec import BASE, COMPONENTS, ModuleKey, ZitSpec


@dataclass(frozen=True)
class Stat:
    """One module: Frobenius norm of dW, its effective rank (Roy & Vetterli) and the nominal rank (for a
    LyCORIS module: the numerical rank of dW)."""

    norm: float
    effective_rank: float
    rank: int


def frobenius_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """||b @ a||_F from the factors: ||BA||_F^2 = trace((A A^T)(B^T B)), never forming dW."""
    a64, b64 = a.double(), b.double()
    return math.sqrt(max(0.0, float(((a64 @ a64.T) * (b64.T @ b64)).sum())))


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the Shannon entropy of the singular values normalised to sum 1 (0 for a zero matrix)."""
    s = singular_values.double()
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def module_stats(lora: Lora) -> dict[ModuleKey, Stat]:
    """Norm, effective rank and nominal rank of every module's dW."""
    return {
        key: Stat(frobenius_norm(m.b, m.a), effective_rank(factor_svdvals(m.b, m.a)), m.rank)
        for key, m in lora.modules.items()
    }


Stats = Mapping[ModuleKey, Stat]


def _stats(source: Lora | Stats, spec: ZitSpec | None) -> tuple[Stats, ZitSpec]:
    """(per-module stats, model spec) of a LoRA, or of a mapping of stats already computed (spec given)."""
    if isinstance(source, Lora):
        return module_stats(source), spec or source.spec
    if spec is None:
        raise LoraError("stats given without the model spec they belong to")
    return source, spec


# ---- text table -----------------------------------------------------------------------------------------


def _render(header: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns (the first left-aligned), two spaces apart."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


def block_grid(spec: ZitSpec, cells: Mapping[ModuleKey, str]) -> list[str]:
    """Lines of a blocks x components text grid of `cells` (- where a module has no cell)."""
    rows = [[block] + [cells.get((block, c), "-") for c in COMPONENTS] for block in [BASE, *spec.blocks()]]
    return _render(["block", *COMPONENTS], rows)


def _block_table(spec: ZitSpec, stats: Stats, cell: Callable[[Stat], str], total: bool) -> list[str]:
    rows = []
    for block in [BASE, *spec.blocks()]:
        row = [block] + [cell(stats[(block, c)]) if (block, c) in stats else "-" for c in COMPONENTS]
        if total:
            norms = [s.norm for (b, _), s in stats.items() if b == block]
            row.append(f"{math.sqrt(sum(n * n for n in norms)):.4g}" if norms else "-")
        rows.append(row)
    return _render(["block", *COMPONENTS, *(["all"] if total else [])], rows)


def _base_lines(stats: Stats) -> list[str]:
    rows = [[name, f"{s.norm:.4g}", f"{s.effective_rank:.2f}", str(s.rank)]
            for (block, name), s in stats.items() if block == BASE]
    if not rows:
        return []
    return ["", "BASE modules", *_render(["module", "norm", "erank", "rank"], rows)]


def stats_table(source: Lora | Stats, spec: ZitSpec | None = None, rank_label: str = "nominal rank") -> str:
    """Plain-text tables, blocks x components: norm of dW (and block total), then effective/nominal rank.

    `source` is a LoRA, or per-module stats (e.g. of a LyCORIS file) with the `spec` they belong to.
    """
    stats, spec = _stats(source, spec)
    lines = ["Frobenius norm of dW ('all' = root sum of squares over the block's modules; - = no module)"]
    lines += _block_table(spec, stats, lambda s: f"{s.norm:.4g}", total=True)
    lines += ["", f"Effective rank / {rank_label}"]
    lines += _block_table(spec, stats, lambda s: f"{s.effective_rank:.2f}/{s.rank}", total=False)
    lines += _base_lines(stats)
    return "\n".join(lines)


# ---- heatmap --------------------------------------------------------------------------------------------

CELL, MARGIN, LABEL_W, TITLE_H, HEADER_H, FOOTER_H = 24, 8, 40, 22, 18, 20
BAR_GAP, BAR_W, BAR_LABEL_W = 12, 16, 64
METRICS: dict[str, tuple[str, Callable[[Stat], float]]] = {
    "norm": ("Frobenius norm of dW", lambda s: s.norm),
    "erank": ("effective rank of dW", lambda s: s.effective_rank),
    "effective_rank": ("effective rank of dW", lambda s: s.effective_rank),
    "rank": ("nominal rank", lambda s: float(s.rank)),
}
_VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
_MISSING, _INK, _PAPER = (225, 225, 225), (20, 20, 20), (255, 255, 255)


def colour(t: float) -> tuple[int, int, int]:
    """Viridis-like colour of t in [0, 1] (clamped), by linear interpolation between five anchors."""
    t = min(1.0, max(0.0, t)) * (len(_VIRIDIS) - 1)
    i = min(int(t), len(_VIRIDIS) - 2)
    f = t - i
    lo, hi = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(round(x + (y - x) * f) for x, y in zip(lo, hi, strict=True))


def heatmap_size(n_rows: int) -> tuple[int, int]:
    """(width, height) in pixels of a heatmap with `n_rows` block rows and one column per component."""
    width = MARGIN + LABEL_W + len(COMPONENTS) * CELL + BAR_GAP + BAR_W + BAR_LABEL_W + MARGIN
    return width, MARGIN + TITLE_H + HEADER_H + n_rows * CELL + FOOTER_H + MARGIN


def _centered(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, face, fill) -> None:
    draw.text(xy, text, font=face, fill=fill, anchor="mm")


def _colour_bar(draw: ImageDraw.ImageDraw, x: int, y: int, height: int, lo: float, hi: float,
                label: str) -> None:
    """The colour scale from lo (bottom) to hi (top), round tick values and the metric's short name."""
    for j in range(height):
        draw.line([(x, y + j), (x + BAR_W - 1, y + j)], fill=colour(1 - j / max(1, height - 1)))
    draw.rectangle([x, y, x + BAR_W - 1, y + height - 1], outline=_INK)
    draw.text((x, y - 8), label, font=font(12), fill=_INK, anchor="ls")
    ticks = [t for t in nice_ticks(lo, hi, 6) if lo <= t <= hi]
    for v in sorted({lo, hi, *ticks}):
        ty = y + round((1 - (v - lo) / (hi - lo)) * (height - 1))
        if v not in (lo, hi) and min(abs(v - lo), abs(hi - v)) / (hi - lo) < 0.06:
            continue  # a round tick right next to an end label would print over it
        draw.line([(x + BAR_W, ty), (x + BAR_W + 3, ty)], fill=_INK)
        draw.text((x + BAR_W + 6, ty), f"{v:.3g}", font=font(11), fill=_INK, anchor="lm")


def _footer(stats: Stats) -> str:
    base = [s.norm for (block, _), s in stats.items() if block == BASE]
    text = "grey: no module"
    if base:
        text += f"; BASE: {len(base)} modules, norm {math.sqrt(sum(n * n for n in base)):.3g}"
    return text


def heatmap_png(source: Lora | Stats, path: str | Path | None = None, metric: str = "norm",
                spec: ZitSpec | None = None) -> Image.Image:
    """Blocks x components heatmap of `metric` (norm, erank or rank) with a colour scale; saved to `path`.

    `source` is a LoRA, or per-module stats with the `spec` they belong to.
    """
    if metric not in METRICS:
        raise LoraError(f"heatmap: unknown metric {metric!r} (use {', '.join(METRICS)})")
    label, value = METRICS[metric]
    stats, spec = _stats(source, spec)
    blocks = spec.blocks()
    values = {k: value(s) for k, s in stats.items() if k[0] != BASE}
    lo = min([0.0, *values.values()])
    hi = max([lo, *values.values()])
    hi = hi if hi > lo else lo + 1.0

    image = Image.new("RGB", heatmap_size(len(blocks)), _PAPER)
    draw, small = ImageDraw.Draw(image), font(11)
    draw.text((MARGIN, MARGIN + TITLE_H // 2), f"{label} per block x component", font=font(13), fill=_INK,
              anchor="lm")
    x0, y0 = MARGIN + LABEL_W, MARGIN + TITLE_H + HEADER_H
    for j, comp in enumerate(COMPONENTS):  # 10 px: "adaLN" just fits its 24 px column
        _centered(draw, (x0 + j * CELL + CELL / 2, y0 - HEADER_H / 2), comp, font(10), _INK)
    for i, block in enumerate(blocks):
        y = y0 + i * CELL
        draw.text((x0 - 4, y + CELL / 2), block, font=font(12), fill=_INK, anchor="rm")
        for j, comp in enumerate(COMPONENTS):
            v = values.get((block, comp))
            fill = _MISSING if v is None else colour((v - lo) / (hi - lo))
            x = x0 + j * CELL
            draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], fill=fill, outline=_PAPER)
    grid_h = len(blocks) * CELL
    _colour_bar(draw, x0 + len(COMPONENTS) * CELL + BAR_GAP, y0, grid_h, lo, hi,
                {"effective_rank": "erank"}.get(metric, metric))
    draw.text((MARGIN, y0 + grid_h + FOOTER_H // 2), _footer(stats), font=small, fill=_INK, anchor="lm")
    if path is not None:
        image.save(path, format="PNG")
    return image
