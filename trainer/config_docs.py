"""The training settings as documentation: each field's allowed values in words, and the per-section tables
of docs/training.md, generated from the one field table (`FIELDS`) so the reference cannot drift.

docs/training.md holds hand-written prose per section and, between the markers
`<!-- fields:SECTION -->` and `<!-- /fields:SECTION -->`, a generated table. Regenerate it with

    python -m trainer.config_docs            # rewrite the tables in docs/training.md
    python -m trainer.config_docs --check    # exit 1 if they are stale (tests/test_docs.py does the same)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .config_fields import FIELDS, SECTIONS, FieldSpec, _num, _show

TRAINING_DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
"""docs/training.md of this checkout."""

_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
_ITEM_WORDS = {int: "integers", float: "numbers", str: "strings"}
_TAG = re.compile(r"<(?=[A-Za-z/!?])")  # a `<` that would open an HTML tag
_BLOCK = re.compile(r"(<!-- fields:(\w+) -->\n)(.*?)(<!-- /fields:\2 -->)", re.S)


def _bound(x: float) -> str:
    """A bound as written: `0.5`, `4096`, and `2^63` for the largest seed."""
    if x >= 2**20 and float(x).is_integer() and int(x) & (int(x) - 1) == 0:
        return f"2^{int(x).bit_length() - 1}"
    return _num(x)


def _bounds(spec: FieldSpec) -> str:
    """The numeric range of a field as `x >= 1`, `0 <= x < 1`, or '' when unbounded."""
    low = ("<", spec.gt) if spec.gt is not None else ("<=", spec.ge) if spec.ge is not None else None
    high = ("<", spec.lt) if spec.lt is not None else ("<=", spec.le) if spec.le is not None else None
    if low and high:
        return f"{_bound(low[1])} {low[0]} x {high[0]} {_bound(high[1])}"
    if low:
        return f"x {'>' if low[0] == '<' else '>='} {_bound(low[1])}"
    return f"x {high[0]} {_bound(high[1])}" if high else ""


def allowed_values(spec: FieldSpec) -> str:
    """What a field accepts, in words: `one of "a", "b"`, `an integer, x >= 1`, `true or false`, ..."""
    if spec.choices:
        return "one of " + ", ".join(_show(c) for c in spec.choices)
    parts = []
    if spec.kind is tuple:
        size = (f"a list of exactly {spec.length} " if spec.length is not None
                else "a non-empty list of " if spec.min_len == 1
                else f"a list of at least {spec.min_len} " if spec.min_len else "a list of ")
        parts.append(size + _ITEM_WORDS[spec.item])
    else:
        parts.append(_KIND_WORDS[spec.kind])
    bounds = _bounds(spec)
    if bounds:
        parts.append(("each " if spec.kind is tuple else "") + bounds)
    if spec.multiple_of:
        parts.append(f"a multiple of {spec.multiple_of}")
    if spec.pattern:
        parts[0] += f" that {spec.pattern_msg}"
    return ", ".join(parts)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (no column break, tag or emphasis)."""
    return _TAG.sub("&lt;", text.replace("|", "\\|").replace("*", "\\*"))


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _allowed_cell(spec: FieldSpec) -> str:
    if spec.choices:
        return "one of " + ", ".join(f"`{c}`" for c in spec.choices)
    return _cell(allowed_values(spec))


def fields_table(section: str) -> str:
    """The markdown table of one config section: key, default, allowed values, what it does."""
    if section not in SECTIONS:
        raise ValueError(f"unknown config section {section!r}; expected one of {', '.join(SECTIONS)}")
    rows = ["| key | default | allowed values | what it does |", "|---|---|---|---|"]
    for spec in FIELDS.values():
        if spec.section == section:
            rows.append(f"| `{spec.key}` | {_code(_cell(_show(spec.default)))} | {_allowed_cell(spec)} | "
                        f"{_cell(spec.doc)} |")
    return "\n".join(rows) + "\n"


def render_reference(text: str) -> str:
    """`text` (docs/training.md) with every `<!-- fields:SECTION -->` block replaced by its current table."""
    return _BLOCK.sub(lambda m: m[1] + fields_table(m[2]) + m[4], text)


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with --check, verify) the generated tables of docs/training.md; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m trainer.config_docs",
                                     description="Regenerate the settings tables of docs/training.md.")
    parser.add_argument("path", nargs="?", default=str(TRAINING_DOC), help="the file (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="only report whether the tables are current")
    args = parser.parse_args(argv)
    path = Path(args.path)
    text = path.read_text(encoding="utf-8")
    new = render_reference(text)
    if args.check:
        if new != text:
            print(f"{path}: the settings tables are stale; run `python -m trainer.config_docs`",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new, encoding="utf-8")
        print(f"{path}: tables updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
