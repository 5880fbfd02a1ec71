"""The one validated training config, shared by the CLI (TOML file), the ComfyUI node and the LoRA metadata.

Every field is declared once, in trainer/config_fields.py, with its default (Z-Image-Turbo's), a one-line doc
and its rules (choices, bounds, multiple-of, pattern). Validation is driven by that table (`FIELDS`) plus a
short list of cross-field rules (trainer/config_rules.py); every error names the dotted field and the value,
e.g. `optim.lr = -1: must be > 0`.

Decisions worth knowing:
- Paths are kept as written (relative paths are relative to the working directory) and are not checked
  for existence here: the loader that opens them reports a missing file, naming the field.
- `model.transformer` and `data.dataset` are required; `TrainConfig()` itself is only the table of
  defaults, `config_from_dict` is what validates.
- Options that only one mode reads are errors when set (away from their default) in another mode, so no
  option silently does nothing: `turbo.adapter`, `turbo.adapter_strength` (adapter modes),
  `turbo.guidance_scale` (`adapter_dg` only), `lora.target_regex` (`custom` targets only). Tuning knobs of a
  choice (`objective.shift`, `optim.restarts`, `optim.ema_decay`, ...) are ignored when their choice is
  not selected, as their docs say.
- `turbo.guidance_scale` is the differential-guidance strength handed to the objective in `adapter_dg`
  mode (default 1.0; 0 would be plain `adapter` mode and is refused there). `TurboConfig.dg_scale` is the
  one value the objective should read: the scale in `adapter_dg` mode, 0.0 otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .config_docs import allowed_values
from .config_fields import (  # noqa: F401 - the config's public names live here too
    FIELDS,
    MEMORY_PLANS,
    SECTIONS,
    DataConfig,
    FieldSpec,
    LoraConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    PreviewConfig,
    SaveConfig,
    TrainConfig,
    TurboConfig,
    _num,
    _show,
)
from .config_rules import _CROSS_RULES
from .errors import ZitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ZitError):
    """An invalid training config; `errors` lists every problem, each naming its dotted field."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = list(errors)
        if len(errors) == 1:
            text = f"{source}: {errors[0]}"
        else:
            text = f"{source}: {len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors)
        super().__init__(text)


# ---------------------------------------------------------------------------------------------- values


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _coerce_scalar(kind: type, value: Any) -> tuple[Any, str | None]:
    """Value converted to kind (int -> float allowed), or an error; bools are never numbers."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        return None, f"must be {_KIND_NAMES[kind]}"
    if kind is float and not math.isfinite(value):
        return None, "must be finite"
    return value, None


_BOUNDS: tuple[tuple[str, Callable[[float, float], bool], str], ...] = (
    ("gt", lambda v, b: v > b, ">"),
    ("ge", lambda v, b: v >= b, ">="),
    ("lt", lambda v, b: v < b, "<"),
    ("le", lambda v, b: v <= b, "<="),
)


def _rule_error(spec: FieldSpec, value: Any) -> str | None:
    """The first rule of spec that a scalar value breaks, as 'must ...', or None."""
    if spec.choices and value not in spec.choices:
        close = difflib.get_close_matches(value, spec.choices, n=1, cutoff=0.6)
        return (
            "must be one of "
            + ", ".join(_show(c) for c in spec.choices)
            + _hint(_show(close[0]) if close else None)
        )
    for attr, holds, sign in _BOUNDS:
        bound = getattr(spec, attr)
        if bound is not None and not holds(value, bound):
            return f"must be {sign} {_num(bound)}"
    if spec.multiple_of and value % spec.multiple_of:
        return f"must be a multiple of {spec.multiple_of}"
    if spec.pattern and not re.match(spec.pattern, value):
        return spec.pattern_msg
    return None


def _check_tuple(spec: FieldSpec, value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, (list, tuple)):
        return None, f"must be a list of {_PLURALS[spec.item]}"
    if spec.length is not None and len(value) != spec.length:
        return None, f"must have exactly {spec.length} items"
    if len(value) < spec.min_len:
        return None, f"must have at least {spec.min_len} item" + ("s" if spec.min_len > 1 else "")
    items = []
    for v in value:
        item, err = _coerce_scalar(spec.item, v)
        err = err or _rule_error(spec, item)
        if err:
            return None, f"item {_show(v)} {err}"
        items.append(item)
    return tuple(items), None


def _field_error(spec: FieldSpec, value: Any) -> tuple[Any, str | None]:
    """The value converted to the field's kind, or an error 'field = value: must ...'."""
    if spec.kind is tuple:
        out, err = _check_tuple(spec, value)
    else:
        out, err = _coerce_scalar(spec.kind, value)
        err = err or _rule_error(spec, out)
    return out, (f"{spec.dotted} = {_show(value)}: {err}" if err else None)


def check_field(dotted: str, value: Any) -> Any:
    """The value converted to the field's kind; raises ConfigError naming the field and value if invalid."""
    spec = FIELDS.get(dotted)
    if spec is None:
        section, _, key = dotted.rpartition(".")
        raise ConfigError("config", [f"unknown key {dotted}{_suggest_key(key, section or None)}"])
    out, err = _field_error(spec, value)
    if err:
        raise ConfigError("config", [err])
    return out


def validate_config(cfg: TrainConfig, source: str = "config") -> TrainConfig:
    """Check every field and cross-field rule of cfg; returns cfg or raises one ConfigError listing all."""
    errors = [
        err
        for spec in FIELDS.values()
        if (err := _field_error(spec, getattr(getattr(cfg, spec.section), spec.key))[1])
    ]
    if not errors:
        errors = [e for rule in _CROSS_RULES for e in rule(cfg) if e]
    if errors:
        raise ConfigError(source, errors)
    return cfg


# ---------------------------------------------------------------------------------------------- dict / TOML


def _hint(name: str | None) -> str:
    return f" (did you mean {name}?)" if name else ""


def _suggest_section(name: str) -> str:
    """' (did you mean [optim]?)' for a misspelt section name, or ''."""
    close = difflib.get_close_matches(name, list(SECTIONS), n=1, cutoff=0.6)
    return _hint(f"[{close[0]}]" if close else None)


def _suggest_key(key: str, section: str | None) -> str:
    """' (did you mean data.caption?)' for a key in the wrong section (or at top level), or a misspelt one."""
    exact = next((s.dotted for s in FIELDS.values() if s.key == key), None)
    if exact:
        return _hint(exact)
    same = [s.key for s in FIELDS.values() if s.section == section]
    close = difflib.get_close_matches(key, same, n=1, cutoff=0.6)
    if close:
        return _hint(f"{section}.{close[0]}")
    by_key = {s.key: s.dotted for s in FIELDS.values()}
    close = difflib.get_close_matches(key, list(by_key), n=1, cutoff=0.8)
    return _hint(by_key[close[0]] if close else None)


def _parse_section(name: str, values: Any, errors: list[str]) -> Any:
    cls = SECTIONS[name]
    if not isinstance(values, dict):
        errors.append(f"{name} = {_show(values)}: must be a table [{name}]")
        return cls()
    kwargs = {}
    for key, value in values.items():
        spec = FIELDS.get(f"{name}.{key}")
        if spec is None:
            errors.append(f"unknown key {name}.{key}{_suggest_key(key, name)}")
            continue
        kwargs[key], err = _field_error(spec, value)
        if err:
            errors.append(err)
    return cls(**kwargs)


def config_from_dict(d: dict[str, Any], source: str = "config") -> TrainConfig:
    """Build and validate a TrainConfig from nested {section: {key: value}}; raises ConfigError."""
    errors: list[str] = []
    for key in d:
        if key in SECTIONS:
            continue
        if isinstance(d[key], dict):
            errors.append(f"unknown section [{key}]{_suggest_section(key)}")
        else:
            errors.append(f"unknown top-level key {key}{_suggest_key(key, None)}")
    sections = {name: _parse_section(name, d.get(name, {}), errors) for name in SECTIONS}
    if errors:
        raise ConfigError(source, errors)
    return validate_config(TrainConfig(**sections), source)


def config_to_dict(cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """The config as nested plain dicts (lists for tuples): TOML- and JSON-ready."""
    return {
        name: {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
        for name, section in ((n, getattr(cfg, n)) for n in SECTIONS)
    }


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _toml_value(value: Any) -> str:
    """One TOML value (scalar or flat array); floats keep their exact repr."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} to a TOML config")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _show(value)


TOML_HEADER = (
    "zit-trainer training config: every setting with its default. Train with",
    "`python -m trainer train --config FILE`; keys left out keep their defaults.",
    "Every setting, its allowed values and what it does: docs/training.md in the zit-trainer folder.",
    "More: docs/turbo.md (turbo.mode), docs/memory.md (model.memory), docs/dialects.md (lora.save_dialect),",
    "docs/block_weights.md, and the index docs/README.md.",
)
"""The comment `python -m trainer config` starts with (the docs it names are in the repository's docs/)."""
_COMMENT_WIDTH = 108


def _comment(text: str) -> list[str]:
    """`text` as '# ' comment lines no wider than the project's line length."""
    return [f"# {line}" for line in textwrap.wrap(text, _COMMENT_WIDTH, break_long_words=False,
                                                  break_on_hyphens=False)]


def config_to_toml(cfg: TrainConfig, comments: bool = True) -> str:
    """The config as TOML text; with comments, a header naming the docs, each section's and field's doc and
    each field's allowed values (every choice listed)."""
    lines: list[str] = [f"# {line}" for line in TOML_HEADER] if comments else []
    for name, values in config_to_dict(cfg).items():
        if lines:
            lines.append("")
        if comments:
            lines += _comment(SECTIONS[name].__doc__ or name)
        lines.append(f"[{name}]")
        for key, value in values.items():
            if comments:
                spec = FIELDS[f"{name}.{key}"]
                lines += _comment(spec.doc)
                allowed = allowed_values(spec)
                if allowed not in ("text", "true or false"):
                    lines += _comment(f"allowed: {allowed}")
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"invalid TOML: {exc}"]) from None


def read_config_text(path: str | Path) -> str:
    """A config file's text (UTF-8, a leading byte-order mark allowed); ConfigError naming the file when it
    is missing, a folder, unreadable or not UTF-8."""
    from .files import os_reason

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [os_reason(exc)]) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        why = f"not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); save it as UTF-8"
        raise ConfigError(str(path), [why]) from None


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a TOML training config file."""
    return config_from_dict(_parse_toml(read_config_text(path), str(path)), source=str(path))


def apply_overrides(cfg: TrainConfig, toml_text: str, source: str = "advanced settings") -> TrainConfig:
    """cfg with the keys given in toml_text (e.g. the node's advanced-settings box) replaced, validated."""
    overrides = _parse_toml(toml_text, source)
    if not overrides:
        return cfg
    merged: dict[str, Any] = config_to_dict(cfg)
    for key, value in overrides.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return config_from_dict(merged, source=source)


def config_diff(old: TrainConfig, new: TrainConfig) -> list[str]:
    """Lines 'section.key: old -> new' for every field that differs (e.g. to report on resume)."""
    return [f"{s.dotted}: {_show(a)} -> {_show(b)}" for s, a, b in _field_pairs(old, new) if a != b]


def _field_pairs(a: TrainConfig, b: TrainConfig) -> Iterator[tuple[FieldSpec, Any, Any]]:
    for spec in FIELDS.values():
        yield spec, getattr(getattr(a, spec.section), spec.key), getattr(getattr(b, spec.section), spec.key)
