"""Block and component weights: the 35-entry ZIT block vector, presets, range syntax, and applying them.

A module's weight is `ratio * block_weight * component_multiplier`; BASE modules (embedders, final
layer: no block, no component) take `ratio * BASE` only.

Block text (`parse_blocks`) takes one of three forms:

- a preset name (see PRESETS), e.g. `late`;
- a comma vector of numbers in VECTOR_BLOCKS order, filled by length:
  1 = every block; 30 = L00..L29 (BASE and refiners 1); 31 = BASE, L00..L29 (refiners 1);
  34 = L00..L29, NR0, NR1, CR0, CR1 (BASE 1); 35 = BASE, L00..L29, NR0, NR1, CR0, CR1;
- assignments `NAME=VALUE`, comma separated, case-insensitive: `BASE`, `L` (all main layers), `L07`,
  `L10-19` (also `L10-L19`), `NR` / `CR` (both noise / context refiners), `NR1`, `CR0`, `R` (all four
  refiners) and `%default` (or `default`). Blocks start at 1; `%default` is applied first wherever it is
  written (it fills every block no other assignment names); the others apply left to right, later wins.

Component text (`parse_components`) is assignments over adaLN, q, k, v, out, w1, w2, w3 plus the groups
`attn` (q, k, v, out), `qkv`, `ffn` (w1, w2, w3) and `%default`, with the same rules; unlisted = 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..errors import ZitError
from .canonical import Lora, LoraModule
from .spec import ATTENTION, BASE, COMPONENTS, FFN, MAIN_BLOCKS, REFINER_BLOCKS, VECTOR_BLOCKS, ModuleKey


class BlockWeightError(ZitError):
    """A block-weight or component text we refuse; the message quotes the offending token."""


N_BLOCKS = len(VECTOR_BLOCKS)
FILL_LENGTHS: dict[int, str] = {
    1: "every block",
    30: "L00..L29",
    31: "BASE, L00..L29",
    34: "L00..L29, NR0, NR1, CR0, CR1",
    35: "BASE, L00..L29, NR0, NR1, CR0, CR1",
}
# name -> (block text, component text); the component part multiplies any explicit component text.
PRESETS: dict[str, tuple[str, str]] = {
    "all": ("1", ""),
    "none": ("0", ""),
    "early": ("L=0,L00-09=1", ""),
    "middle": ("L=0,L10-19=1", ""),
    "late": ("L=0,L20-29=1", ""),
    "no-early": ("L00-09=0", ""),
    "no-middle": ("L10-19=0", ""),
    "no-late": ("L20-29=0", ""),
    "attention-only": ("BASE=0", "ffn=0,adaLN=0"),
    "ffn-only": ("BASE=0", "attn=0,adaLN=0"),
    "no-adaLN": ("1", "adaLN=0"),
    "refiners-off": ("R=0", ""),
    "main-only": ("BASE=0,R=0", ""),
    "no-base": ("BASE=0", ""),
}

_INDEX: dict[str, int] = {name: i for i, name in enumerate(VECTOR_BLOCKS)}
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_DEFAULT = ("%default", "default")
_BLOCK_GROUPS: dict[str, tuple[str, ...]] = {
    "BASE": (BASE,),
    "L": MAIN_BLOCKS,
    "NR": REFINER_BLOCKS[:2],
    "CR": REFINER_BLOCKS[2:],
    "R": REFINER_BLOCKS,
}
_BLOCK_NAMES = "BASE, L, L00..L29, L10-19, NR, NR0, NR1, CR, CR0, CR1, R or %default"
_COMPONENT_GROUPS: dict[str, tuple[str, ...]] = {
    **{c.lower(): (c,) for c in COMPONENTS},
    "attn": ATTENTION,
    "attention": ATTENTION,
    "qkv": ATTENTION[:3],
    "ffn": FFN,
    "mlp": FFN,
}
_COMPONENT_NAMES = ", ".join(COMPONENTS) + ", attn, qkv, ffn or %default"


def format_number(x: float) -> str:
    """Shortest text that parses back to exactly `x`: `1`, `0.5`, `1e-05`."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def _number(token: str, text: str, hint: str = "") -> float:
    s = text.strip()
    if not _NUMBER.fullmatch(s):
        raise BlockWeightError(f"{token!r}: {s!r} is not a number{hint}")
    value = float(s)
    if not math.isfinite(value):
        raise BlockWeightError(f"{token!r}: {s!r} is out of range")
    return value


def _tokens(text: str, what: str) -> list[str]:
    tokens = [t.strip() for t in text.split(",")]
    for i, t in enumerate(tokens):
        if not t:
            raise BlockWeightError(f"{what}: entry {i + 1} of {text!r} is empty")
    return tokens


def _assignments(text: str, what: str, targets: Callable[[str, str], Iterable[str]]) -> dict[str, float]:
    """Parse `NAME=VALUE,...`: return the default (key `%default`, if any) then the named targets in order."""
    default: dict[str, float] = {}
    named: dict[str, float] = {}
    for token in _tokens(text, what):
        name, eq, value = token.partition("=")
        if not eq:
            raise BlockWeightError(f"{what}: {token!r} is not an assignment NAME=VALUE")
        name = name.strip()
        number = _number(token, value)
        if name.lower() in _DEFAULT:
            default["%default"] = number
            continue
        for target in targets(token, name):
            named[target] = number
    return {**default, **named}


def _main_index(token: str, digits: str) -> int:
    index = int(digits)
    if not 0 <= index < len(MAIN_BLOCKS):
        raise BlockWeightError(f"{token!r}: layer {index} is out of 0..{len(MAIN_BLOCKS) - 1}")
    return index


def _block_targets(token: str, name: str) -> tuple[str, ...]:
    """The blocks a range-syntax name covers."""
    upper = re.sub(r"\s+", "", name).upper()
    if upper in _BLOCK_GROUPS:
        return _BLOCK_GROUPS[upper]
    if m := re.fullmatch(r"L(\d+)", upper):
        return (MAIN_BLOCKS[_main_index(token, m[1])],)
    if m := re.fullmatch(r"L(\d+)-L?(\d+)", upper):
        lo, hi = _main_index(token, m[1]), _main_index(token, m[2])
        if lo > hi:
            raise BlockWeightError(f"{token!r}: reversed range {lo}-{hi} (write L{hi:02d}-{lo:02d})")
        return MAIN_BLOCKS[lo : hi + 1]
    if m := re.fullmatch(r"(NR|CR)(\d+)", upper):
        if int(m[2]) not in (0, 1):
            raise BlockWeightError(f"{token!r}: refiner {int(m[2])} is out of 0..1")
        return (f"{m[1]}{int(m[2])}",)
    raise BlockWeightError(f"{token!r}: unknown block {name!r} (use {_BLOCK_NAMES})")


def _parse_vector(text: str) -> tuple[float, ...]:
    hint = " (a vector holds numbers only; name blocks as NAME=VALUE, e.g. L07=0)"
    values = [_number(t, t, hint) for t in _tokens(text, "block weights")]
    n = len(values)
    if n not in FILL_LENGTHS:
        accepted = "; ".join(f"{k} ({v})" for k, v in FILL_LENGTHS.items())
        raise BlockWeightError(f"block weights: got {n} values; accepted lengths are {accepted}")
    if n == 1:
        return tuple(values * N_BLOCKS)
    if n in (30, 34):
        values = [1.0, *values]
    return tuple(values + [1.0] * (N_BLOCKS - len(values)))


def _parse_ranges(text: str) -> tuple[float, ...]:
    assigned = _assignments(text, "block weights", _block_targets)
    default = assigned.pop("%default", 1.0)
    return tuple(assigned.get(block, default) for block in VECTOR_BLOCKS)


def _preset(text: str) -> tuple[str, str] | None:
    lowered = {name.lower(): value for name, value in PRESETS.items()}
    return lowered.get(text.strip().lower())


def parse_blocks(text: str) -> tuple[float, ...]:
    """The 35 block weights (VECTOR_BLOCKS order) of a preset name, a comma vector or range text."""
    if not text.strip():
        return (1.0,) * N_BLOCKS
    preset = _preset(text)
    if preset is not None:
        return parse_blocks(preset[0])
    if "=" in text:
        return _parse_ranges(text)
    return _parse_vector(text)


def _component_targets(token: str, name: str) -> tuple[str, ...]:
    targets = _COMPONENT_GROUPS.get(name.lower())
    if targets is None:
        raise BlockWeightError(f"{token!r}: unknown component {name!r} (use {_COMPONENT_NAMES})")
    return targets


def parse_components(text: str) -> dict[str, float]:
    """Component multipliers from `adaLN=0,q=0.5`-style text; unlisted components are 1."""
    if not text.strip():
        return dict.fromkeys(COMPONENTS, 1.0)
    assigned = _assignments(text, "components", _component_targets)
    default = assigned.pop("%default", 1.0)
    return {c: assigned.get(c, default) for c in COMPONENTS}


@dataclass(frozen=True)
class BlockWeights:
    """Resolved weights: 35 block weights in VECTOR_BLOCKS order, 8 component multipliers and a ratio."""

    blocks: tuple[float, ...] = (1.0,) * N_BLOCKS
    components: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 1.0))
    ratio: float = 1.0

    def __post_init__(self) -> None:
        blocks = tuple(float(x) for x in self.blocks)
        if len(blocks) != N_BLOCKS:
            raise BlockWeightError(f"block weights: need {N_BLOCKS} values, got {len(blocks)}")
        unknown = set(self.components) - set(COMPONENTS)
        if unknown:
            raise BlockWeightError(f"components: unknown component(s) {sorted(unknown)}")
        components = {c: float(self.components.get(c, 1.0)) for c in COMPONENTS}
        values = (*blocks, *components.values(), float(self.ratio))
        if not all(math.isfinite(v) for v in values):
            raise BlockWeightError("block weights: every weight and the ratio must be finite")
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "components", components)
        object.__setattr__(self, "ratio", float(self.ratio))

    def block_weight(self, block: str) -> float:
        """The vector entry of one block (`BASE`, `L07`, `NR1`, ...)."""
        if block not in _INDEX:
            raise BlockWeightError(f"block {block!r} has no entry in the ZIT block vector")
        return self.blocks[_INDEX[block]]

    def weight(self, key: ModuleKey) -> float:
        """ratio x block weight x component multiplier (BASE modules: ratio x BASE weight)."""
        block, component = key
        if block == BASE:
            return self.ratio * self.blocks[0]
        if component not in self.components:
            raise BlockWeightError(f"module {block}.{component}: unknown component {component!r}")
        return self.ratio * self.block_weight(block) * self.components[component]

    def combined(self, other: BlockWeights) -> BlockWeights:
        """The weights of applying `self` then `other` (element-wise products)."""
        return BlockWeights(
            tuple(a * b for a, b in zip(self.blocks, other.blocks, strict=True)),
            {c: self.components[c] * other.components[c] for c in COMPONENTS},
            self.ratio * other.ratio,
        )

    def vector_string(self) -> str:
        """The resolved 35-value comma vector, e.g. `1,1,0.5,...`."""
        return ",".join(format_number(x) for x in self.blocks)

    def components_string(self) -> str:
        """The resolved multipliers, e.g. `adaLN=1,q=1,k=1,v=1,out=1,w1=1,w2=1,w3=1`."""
        return ",".join(f"{c}={format_number(self.components[c])}" for c in COMPONENTS)


def resolve(spec: str = "all", components: str = "", ratio: float = 1.0) -> BlockWeights:
    """BlockWeights from a preset name / vector / range text, component text and a ratio."""
    preset = _preset(spec)
    block_text, preset_components = preset if preset is not None else (spec, "")
    base = parse_components(preset_components)
    extra = parse_components(components)
    return BlockWeights(parse_blocks(block_text), {c: base[c] * extra[c] for c in COMPONENTS}, ratio)


META_BLOCKS, META_COMPONENTS, META_RATIO = "zit.blocks", "zit.components", "zit.ratio"


def recorded_weights(lora: Lora) -> BlockWeights | None:
    """The weights apply_weights recorded in the metadata, or None when there are none (or unreadable)."""
    meta = lora.metadata
    if META_BLOCKS not in meta:
        return None
    try:
        ratio = _number(META_RATIO, meta.get(META_RATIO, "1"))
        return BlockWeights(parse_blocks(meta[META_BLOCKS]), parse_components(meta.get(META_COMPONENTS, "")),
                            ratio)
    except BlockWeightError:
        return None


def apply_weights(lora: Lora, weights: BlockWeights) -> Lora:
    """A new Lora with each B scaled by weights.weight(key); weight-0 modules dropped; A tensors shared.

    The metadata records the cumulative weights (these combined with any recorded earlier).
    """
    modules = {}
    for key, m in lora.modules.items():
        w = weights.weight(key)
        if w != 0:
            modules[key] = LoraModule(m.a, m.b * w)  # computed in fp32 internally, rounded once
    earlier = recorded_weights(lora)
    total = weights if earlier is None else earlier.combined(weights)
    metadata = {
        **lora.metadata,
        META_BLOCKS: total.vector_string(),
        META_COMPONENTS: total.components_string(),
        META_RATIO: format_number(total.ratio),
    }
    return Lora(modules, metadata, lora.spec)
