"""The memory plans as text: the term-by-term table of candidate plans (`format_plan_table`), what
`python -m trainer plan` prints for one budget (`plan_report`) and for a list of card sizes
(`card_report`)."""

from __future__ import annotations

import textwrap

from .config import TrainConfig
from .lora.spec import ZitSpec
from .memory import MemoryEstimate, MemoryPlan, MemoryPlanError, choose_plan
from .memory_terms import MEMORY_BANDWIDTH, PCIE_BANDWIDTH, THROUGHPUT, gib


def format_plan_table(estimates: list[MemoryEstimate], chosen: MemoryPlan | None,
                      budget_bytes: int | None = None) -> str:
    """A terminal table: one row per term, one column per candidate plan (GiB), then the total, whether
    it fits the budget and the relative s/step; the chosen plan's notes and the assumptions below."""
    names: list[str] = []
    for e in estimates:
        names += [t.name for t in e.terms if t.name not in names]
    width = max(len(n) for n in [*names, "relative s/step", f"fits {gib(budget_bytes or 0)} GiB?"]) + 2
    cols = [max(len(e.plan.name), 9) + 2 for e in estimates]

    def row(label: str, cells: list[str]) -> str:
        return (label.ljust(width) + "".join(c.rjust(w) for c, w in zip(cells, cols, strict=True))).rstrip()

    lines = [row("GiB", [e.plan.name for e in estimates]),
             row("", [f"{e.plan.resolution} px" for e in estimates])]
    lines.append("-" * len(lines[0]))
    for name in names:
        lines.append(row(name, [gib(e.term(name).bytes) if any(t.name == name for t in e.terms) else "-"
                                for e in estimates]))
    lines.append("-" * len(lines[0]))
    lines.append(row("total (peak)", [gib(e.total) for e in estimates]))
    if budget_bytes is not None:
        fits = ["yes" if e.fits(budget_bytes) else "no" for e in estimates]
        lines.append(row(f"fits {gib(budget_bytes)} GiB?", fits))
    lines.append(row("relative s/step", [f"{e.relative_time:.2f}x" for e in estimates]))
    if chosen is not None:
        lines.append(row("chosen", ["<==" if e.plan == chosen else "" for e in estimates]))
        pick = next((e for e in estimates if e.plan == chosen), None)
        if pick is not None:
            lines += ["", f"{chosen.label}:"] + [f"  {t.name}: {t.note}" for t in pick.terms if t.note]
    top = estimates[0].plan.resolution if estimates else "-"
    footer = (f"s/step relative to bf16 at {top} px, assuming {THROUGHPUT / 1e12:g} TFLOP/s (a step = 4x "
              f"forward with gradient checkpointing, 3x without), dequantization traffic at "
              f"{MEMORY_BANDWIDTH / 1e9:g} GB/s, block swap over PCIe at {PCIE_BANDWIDTH / 1e9:g} GB/s "
              f"overlapped with each block's compute. GiB = 2**30 bytes.")
    return "\n".join(lines + [""] + textwrap.wrap(footer, 100))


def plan_report(cfg: TrainConfig, spec: ZitSpec, budget: int | None, source: str, *,
                text_tokens: int = 512) -> str:
    """What `python -m trainer plan` prints: the budget, the table and the chosen plan; when nothing fits,
    MemoryPlanError with the same budget line and table in `.report`."""
    head = f"budget: {gib(budget)} GiB ({source})" if budget is not None else "budget: none (no CUDA device)"
    head += f"; transformer: {spec.n_layers} layers, dim {spec.dim}; text: {text_tokens} tokens"
    try:
        plan, estimates = choose_plan(cfg, spec, budget, text_tokens=text_tokens)
    except MemoryPlanError as exc:
        exc.report = f"{head}\n{format_plan_table(exc.estimates, None, budget)}"
        raise
    swap = f", model.swap_blocks = {plan.swap_blocks}" if plan.swap_blocks else ""
    return (f"{head}\n{format_plan_table(estimates, plan, budget)}\n\n"
            f"plan: {plan.label} (model.memory = \"{plan.memory}\"{swap})")


def card_report(cfg: TrainConfig, spec: ZitSpec, cards: list[tuple[str, int]], *,
                text_tokens: int = 512) -> str:
    """One line per card size: the plan it gets, its peak and relative s/step, or why nothing fits."""
    width = max(len(c) for c, _ in cards) + 2
    lines = []
    for card, budget in cards:
        try:
            plan, estimates = choose_plan(cfg, spec, budget, text_tokens=text_tokens)
        except MemoryPlanError as exc:
            lines.append(f"{card.ljust(width)}nothing fits: {exc}")
            continue
        e = next(e for e in estimates if e.plan == plan)
        lines.append(f"{card.ljust(width)}{plan.label}: {gib(e.total)} GiB, {e.relative_time:.2f}x s/step")
    return "\n".join(lines)
