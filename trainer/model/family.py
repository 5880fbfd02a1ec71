"""Which member of the Z-Image family a transformer is: Turbo, the non-distilled base, or De-Turbo.

The three share one config and identical tensor shapes, so the weights' header cannot tell them apart. What
can: the file's own metadata (`zit.family`, written by this pack, or a modelspec title / description naming
it) and, for a diffusers folder, the scheduler config (the base ships shift 6, Turbo and De-Turbo shift 3, so
shift 6 means base; shift 3 alone decides nothing). Whatever is not detected comes from the `model.family`
setting; with "auto" and nothing detected the family is taken as Turbo, and the log says it was assumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .headers import ModelLoadError, read_header_and_metadata

FAMILIES = ("turbo", "base", "deturbo")
FAMILY_CHOICES = ("auto", *FAMILIES)
NAMES = {"turbo": "Z-Image-Turbo", "base": "Z-Image (base)", "deturbo": "Z-Image-De-Turbo"}
META_FAMILY = "zit.family"
_TEXT_KEYS = ("modelspec.title", "modelspec.description", "modelspec.architecture", "title", "name",
              "description", "base_model")


@dataclass(frozen=True)
class Family:
    """The family a run trains on and how it was decided (one line for the log)."""

    name: str
    how: str
    assumed: bool = False  # nothing said which it is: Turbo was taken

    @property
    def distilled(self) -> bool:
        """Turbo samples in 8 steps at cfg 1; the base and De-Turbo need 20-50 steps with CFG."""
        return self.name == "turbo"


def _from_text(text: str) -> str | None:
    t = text.lower().replace("_", "-")
    if "de-turbo" in t or "deturbo" in t:
        return "deturbo"
    if "turbo" in t:
        return "turbo"
    if "z-image" in t and "base" in t:
        return "base"
    return None


def _from_metadata(metadata: dict[str, str]) -> tuple[str, str] | None:
    if metadata.get(META_FAMILY) in FAMILIES:
        return metadata[META_FAMILY], f"its metadata {META_FAMILY} = {metadata[META_FAMILY]}"
    for key in _TEXT_KEYS:
        found = _from_text(str(metadata.get(key, "")))
        if found:
            return found, f"its metadata {key} = {metadata[key]!r}"
    return None


def _from_scheduler(folder: Path) -> tuple[str, str] | None:
    for root in (folder, folder.parent):
        config = root / "scheduler" / "scheduler_config.json"
        if config.is_file():
            try:
                shift = float(json.loads(config.read_text(encoding="utf-8")).get("shift", 0))
            except (OSError, ValueError, TypeError):
                return None
            return ("base", f"{config} has shift {shift:g}") if shift == 6.0 else None
    return None


def detect_family(path: str | Path) -> tuple[str, str] | None:
    """(family, evidence) from what the files say, or None when they do not say; reads headers only."""
    path = Path(path)
    if path.is_file():
        return _from_metadata(read_header_and_metadata(path)[1])
    if path.is_dir():
        for file in sorted(path.glob("*.safetensors"))[:1]:
            found = _from_metadata(read_header_and_metadata(file)[1])
            if found:
                return found
        return _from_scheduler(path)
    return None


def resolve_family(setting: str, path: str | Path) -> Family:
    """The family of `path` under `model.family = setting`; ModelLoadError when the two disagree."""
    if setting not in FAMILY_CHOICES:
        raise ModelLoadError(f"model.family = {setting!r}: expected one of {', '.join(FAMILY_CHOICES)}")
    found = detect_family(path)
    if setting == "auto":
        if found:
            return Family(found[0], f"{NAMES[found[0]]} ({found[1]})")
        return Family("turbo", f"{NAMES['turbo']}, assumed: {path} does not say which Z-Image it is "
                               "(set model.family if it is the base or De-Turbo)", assumed=True)
    if found and found[0] != setting:
        raise ModelLoadError(f"model.family = {setting!r}, but {path} is {NAMES[found[0]]}: {found[1]}")
    return Family(setting, f"{NAMES[setting]} (model.family)")


def family_for_mode(family: Family, mode: str) -> Family:
    """The family a run trains with under turbo.mode: "base" takes an undetected model as the base (the user
    said so); a detected or set family that contradicts the mode is refused."""
    if mode == "base" and family.assumed:
        return Family("base", f"{NAMES['base']} (turbo.mode = base; the file does not say)")
    if mode == "base" and family.distilled:
        raise ModelLoadError(f'turbo.mode = "base" trains on Z-Image base or De-Turbo, but the model is '
                             f"{family.how}: use turbo.mode = sft, adapter, adapter_dg or distill")
    if mode != "base" and not family.distilled:
        raise ModelLoadError(f'turbo.mode = "{mode}" is for Z-Image-Turbo, but the model is {family.how}: '
                             'train it with turbo.mode = "base"')
    return family
