"""ZIT LoRA file dialects -> the canonical `Lora`: detect, read, refuse the unreadable (see `writing`).

One table (`_LAYOUTS`) says how each dialect spells a module: prefix, dotted or kohya-underscored names,
diffusers (split q/k/v) or ComfyUI (fused qkv) layout, and the A/B suffixes. One table (`_names`) maps every
module name a file may use to its canonical key. Reading is lenient inside a dialect (both layouts, every
A/B suffix spelling, an `.alpha` wherever it appears); writing emits exactly one spelling.

Scale semantics (read): dW = (alpha / rank) * B @ A with
- an `.alpha` tensor: its value, in every dialect (ComfyUI and diffusers' converter honour it everywhere);
- no `.alpha` tensor: scale 1. This is what kohya sd-scripts / musubi (`create_network_from_weights`:
  "support old LoRA without alpha" -> alpha = dim), ComfyUI (`alpha = 1.0` when v[2] is None) and diffusers'
  `_convert_non_diffusers_z_image_lora_to_diffusers` (`get_alpha_scales` -> 1.0) all do. The
  belief "default 1 -> scale 1/rank" comes from kohya's *training* default `--network_alpha=1`, which is
  always written into the file as an `.alpha` tensor; it does not apply to a file without one.
- diffusers/peft: `lora_alpha`/`r` with `alpha_pattern`/`rank_pattern` (peft's regex match, `use_rslora`)
  from the safetensors header `lora_adapter_metadata` (pipeline form with `transformer.` prefixed keys, or
  unprefixed), else an `adapter_config.json` beside the file, else scale 1.
The canonical form has the scale folded into B, so writers emit alpha = rank (or no alpha) and every
consumer computes the same dW.

ComfyUI fused `attention.qkv`: B rows 0:dim, dim:2dim, 2dim:3dim are q, k, v. Reading splits it and drops,
per slice, the rank columns whose B is exactly zero (exact for dW), so a block-diagonal or zero-padded file
written by us comes back as the original modules; a slice whose B is entirely zero (a module absent from
the file, or a never-trained one) is dropped.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ..files import open_error
from .canonical import Lora, LoraError, LoraModule
from .spec import (
    BASE_MODULES,
    COMFY_SUFFIX,
    DIFFUSERS_SUFFIX,
    QKV_SLICE,
    ZIT,
    ModuleKey,
    ZitSpec,
    comfy_name,
    diffusers_name,
)

DIALECTS: tuple[str, ...] = ("aitoolkit", "diffusers", "diffsynth", "kohya", "comfy", "lycoris")

QKV = "qkv"  # pseudo-component of a fused ComfyUI attention.qkv module (reading/writing only)
META_FORMAT = "zit.format"
META_SPEC = "zit.spec"
PEFT_META = "lora_adapter_metadata"
_RESERVED = (META_FORMAT, META_SPEC, PEFT_META)


@dataclass(frozen=True)
class _Layout:
    prefix: str  # written before every module name
    read_prefixes: tuple[str, ...]  # accepted when reading ("" = none)
    underscore: bool  # kohya style: the module name's dots become underscores
    fused: bool  # ComfyUI names: fused attention.qkv, attention.out, BASE modules by ComfyUI name
    a: str  # suffix of the A ("down") factor
    b: str  # suffix of the B ("up") factor
    alpha: bool  # writes an `.alpha` tensor (= rank) beside each module


_DOWN, _UP = ".lora_down.weight", ".lora_up.weight"
_A, _B = ".lora_A.weight", ".lora_B.weight"
_LAYOUTS: dict[str, _Layout] = {
    "aitoolkit": _Layout("diffusion_model.", ("diffusion_model.",), False, False, _A, _B, False),
    "diffusers": _Layout("transformer.", ("transformer.", "base_model.model.", ""), False, False, _A, _B,
                         False),
    "diffsynth": _Layout("", ("",), False, False, ".lora_A.default.weight", ".lora_B.default.weight", False),
    # `lora_unet__` (double underscore): alibaba-pai's Z-Image-Fun distill LoRAs (VideoX-Fun's kohya names).
    "kohya": _Layout("lora_unet_", ("lora_unet__", "lora_unet_"), True, False, _DOWN, _UP, True),
    "comfy": _Layout("diffusion_model.", ("diffusion_model.", ""), False, True, _DOWN, _UP, True),
    "lycoris": _Layout("lycoris_", ("lycoris_",), True, False, _DOWN, _UP, True),
}
# Every tensor-name ending a LoRA file may use -> the role of the tensor.
_ROLES: dict[str, str] = {
    _A: "a", _B: "b", _DOWN: "a", _UP: "b",
    ".lora_A.default.weight": "a", ".lora_B.default.weight": "b", ".alpha": "alpha",
}

# What a LoRA reader says of a LyCORIS (LoKr / LoHa / diff) file: the commands read it, a LoRA reader cannot.
_CONVERT_HINT = ("not a plain LoRA; `python -m trainer lora convert IN -o OUT --rank N` (or `--energy F`) "
                 "turns it into one")
# Key patterns of files we refuse, with what they are.
_FOREIGN: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), what) for p, what in (
    (r"lokr_w[12]|lokr_t[12]", f"a LoKr adapter (lokr_w1/lokr_w2), {_CONVERT_HINT}"),
    (r"hada_w[12]_[ab]|hada_t[12]", f"a LoHa adapter (hada_w1_a...), {_CONVERT_HINT}"),
    (r"\.diff$", f"a LyCORIS full-weight diff, {_CONVERT_HINT}"),
    (r"dora_scale|lora_magnitude_vector", "a DoRA adapter (magnitude vector), which is not supported: "
                                          "only plain LoRA"),
    (r"(^|[._])(qweight|wscales|wzeros|wcscales|wtscale|smooth|smooth_orig|smooth_factor|w13|proj_down|"
     r"proj_up)([._]|$)", "a nunchaku-quantized layout, which is not supported: use a bf16/fp16 LoRA"),
    (r"^(lora_unet_)?(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]|"
     r"^lora_te\d*_|^(unet|text_encoder(_2)?)\.", "a LoRA for an SD 1.x / SDXL UNet, not Z-Image-Turbo"),
    (r"(^|[._])(double_blocks|single_blocks|transformer_blocks)[._]\d",
     "a LoRA for Flux (or another MMDiT with double/single/transformer_blocks), not Z-Image-Turbo"),
    (r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn)[._]",
     "a LoRA for Wan (blocks.N.self_attn/cross_attn), not Z-Image-Turbo"),
))
# Names only the ComfyUI layout uses (table-derived): they mark a dotted file as the "comfy" dialect.
_COMFY_ONLY_SUFFIXES = tuple(
    sorted("." + s for s in set(COMFY_SUFFIX.values()) - set(DIFFUSERS_SUFFIX.values())))
_COMFY_ONLY_BASE = frozenset(v for k, v in BASE_MODULES.items() if k != v)


@functools.lru_cache(maxsize=8)
def _names(spec: ZitSpec) -> tuple[dict[str, ModuleKey], dict[str, ModuleKey]]:
    """(dotted, kohya-underscored) module name -> canonical key, in both the diffusers and ComfyUI layout."""
    dotted: dict[str, ModuleKey] = {}
    for key in spec.module_keys():
        dotted[diffusers_name(key)] = key
        fused = key[1] in QKV_SLICE
        dotted[comfy_name(key)] = (key[0], QKV) if fused else key
    underscored: dict[str, ModuleKey] = {}
    for name, key in dotted.items():
        flat = name.replace(".", "_")
        if underscored.setdefault(flat, key) != key:
            raise AssertionError(f"spec names {flat!r} ambiguously")
    return dotted, underscored


def _write_name(key: ModuleKey, fused: bool) -> str:
    """The dotted module name a writer uses for a canonical key (or a (block, QKV) fused key)."""
    if key[1] == QKV:
        return comfy_name((key[0], "q"))
    return comfy_name(key) if fused else diffusers_name(key)


def _role(key: str) -> tuple[str, str] | None:
    """Split a tensor name into (module part, role), or None when it ends in no known LoRA suffix."""
    for suffix, role in _ROLES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _refuse_foreign(keys: Iterable[str], source: str) -> None:
    """Raise LoraError for LoRAs of other models, unsupported adapter types and quantized layouts."""
    for k in keys:
        for pattern, what in _FOREIGN:
            if pattern.search(k):
                raise LoraError(f"{source}: key {k!r}: this looks like {what}")


def _detect(keys: list[str], source: str) -> str:
    _refuse_foreign(keys, source)
    if not keys:
        raise LoraError(f"{source}: contains no tensors")
    if any(k.startswith("lycoris_") for k in keys):
        return "lycoris"
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    if any(".default." in k for k in keys):
        return "diffsynth"
    if any(k.startswith(("transformer.", "base_model.model.")) for k in keys):
        return "diffusers"
    parts = [(k, p) for k in keys if (p := _role(k)) is not None]
    if any(m.removeprefix("diffusion_model.").endswith(_COMFY_ONLY_SUFFIXES)
           or m.removeprefix("diffusion_model.") in _COMFY_ONLY_BASE
           or r == "alpha" or k.endswith((_DOWN, _UP)) for k, (m, r) in parts):
        return "comfy"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "aitoolkit"
    if parts:
        return "diffusers"  # peft's model-level save: lora_A/lora_B without any prefix
    raise LoraError(f"{source}: cannot tell which LoRA dialect this is (first key {keys[0]!r}); "
                    f"none of {', '.join(DIALECTS)}")


def detect_dialect(keys: Iterable[str]) -> str:
    """The dialect (one of DIALECTS) of a ZIT LoRA from its tensor names; LoraError if it is none."""
    return _detect(list(keys), "LoRA")


def _spec_from_metadata(metadata: Mapping[str, str], source: str) -> ZitSpec:
    raw = metadata.get(META_SPEC)
    if raw is None:
        return ZIT
    try:
        return ZitSpec(**json.loads(raw))
    except (ValueError, TypeError) as e:
        raise LoraError(f"{source}: metadata {META_SPEC!r} is not a valid model spec: {e}") from e


def _peft_config(metadata: Mapping[str, str], source: str) -> dict | None:
    """The peft LoraConfig dict from diffusers' `lora_adapter_metadata` header (transformer part), or None."""
    raw = metadata.get(PEFT_META)
    if raw is None:
        return None
    try:
        cfg = json.loads(raw)
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise LoraError(f"{source}: metadata {PEFT_META!r} is not valid JSON: {e}") from e
    if any(k.startswith("transformer.") for k in cfg):
        cfg = {k.removeprefix("transformer."): v for k, v in cfg.items() if k.startswith("transformer.")}
    return cfg


def _peft_pattern(patterns: Mapping[str, object], name: str, default: object) -> object:
    """peft's `get_pattern_key`: the first pattern p with re.match(rf"(.*\\.)?({p})$", name) wins."""
    for p, value in patterns.items():
        if re.match(rf"(.*\.)?({p})$", name):
            return value
    return default


def _peft_scale(cfg: Mapping, name: str, rank: int, where: str) -> float:
    """alpha / r (or alpha / sqrt(r) with use_rslora) as peft computes it for module `name`."""
    r = _peft_pattern(cfg.get("rank_pattern") or {}, name, cfg.get("r", 8))
    alpha = _peft_pattern(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8))
    if r != rank:
        raise LoraError(f"{where}: the adapter config gives rank {r} but the tensors have rank {rank}")
    return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _fold(b: torch.Tensor, scale: float) -> torch.Tensor:
    """B times scale, computed in float32 and cast back (B itself when scale is 1)."""
    return b if scale == 1.0 else (b.float() * scale).to(b.dtype)


def _split_qkv(a: torch.Tensor, b: torch.Tensor, dim: int) -> dict[str, LoraModule]:
    """Split a fused qkv LoRA into q, k, v exactly, dropping rank columns whose B slice is all zero."""
    out = {}
    for c, i in QKV_SLICE.items():
        b_slice = b[i * dim:(i + 1) * dim]
        keep = b_slice.ne(0).any(dim=0)
        if keep.any():
            out[c] = LoraModule(a[keep].clone(), b_slice[:, keep].clone())
    return out


def _group(sd: Mapping[str, torch.Tensor], layout: _Layout, spec: ZitSpec,
           source: str) -> dict[ModuleKey, dict[str, str]]:
    """Target module -> {role: tensor name}, with every key resolved through the name table."""
    dotted, underscored = _names(spec)
    table = underscored if layout.underscore else dotted
    prefixes = sorted(layout.read_prefixes, key=len, reverse=True)
    groups: dict[ModuleKey, dict[str, str]] = {}
    for k in sd:
        parts = _role(k)
        prefix = next((p for p in prefixes if k.startswith(p)), None)
        if parts is None or prefix is None:
            raise LoraError(f"{source}: unknown key {k!r}: not a LoRA A/B/alpha tensor of this dialect")
        name = parts[0][len(prefix):]
        if name not in table:
            raise LoraError(f"{source}: key {k!r}: module {name!r} does not exist in Z-Image-Turbo "
                            f"({spec.n_layers} layers, {spec.n_refiner_layers} noise/context refiners)")
        roles = groups.setdefault(table[name], {})
        if parts[1] in roles:
            raise LoraError(f"{source}: key {k!r}: the same tensor is also given as {roles[parts[1]]!r}")
        roles[parts[1]] = k
    return groups


def _factor(sd: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    t = sd[key]
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim != 2:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise LoraError(f"{source}: key {key!r}: a LoRA factor must be a floating-point matrix, got {shape}")
    return t


def lora_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    dialect: str | None = None,
    spec: ZitSpec | None = None,
    source: str = "state dict",
    peft_config: Mapping | None = None,
) -> Lora:
    """Read an in-memory LoRA state dict (+ safetensors metadata) of any dialect into the canonical form.

    The result's metadata is the file's, minus `zit.spec` (now `lora.spec`) and diffusers'
    `lora_adapter_metadata` (its alpha is folded in), with `zit.format` set to the dialect read.
    """
    metadata = dict(metadata or {})
    keys = list(sd)
    if dialect is None:
        dialect = _detect(keys, source)
    else:
        if dialect not in DIALECTS:
            raise LoraError(f"{source}: unknown dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
        _refuse_foreign(keys, source)
        if not keys:
            raise LoraError(f"{source}: contains no tensors")
    layout = _LAYOUTS[dialect]
    spec = spec or _spec_from_metadata(metadata, source)
    cfg = (_peft_config(metadata, source) or peft_config) if dialect == "diffusers" else None
    modules: dict[ModuleKey, LoraModule] = {}
    origin: dict[ModuleKey, str] = {}
    for target, roles in _group(sd, layout, spec, source).items():
        if "a" not in roles or "b" not in roles:
            have = roles.get("a") or roles.get("b") or roles["alpha"]
            missing = "B (up)" if "a" in roles else "A (down)" if "b" in roles else "A and B"
            raise LoraError(f"{source}: key {have!r}: its {missing} factor is missing")
        where = f"{source}: key {roles['a']!r}"
        a, b = _factor(sd, roles["a"], source), _factor(sd, roles["b"], source)
        if a.shape[0] != b.shape[1]:
            raise LoraError(f"{where}: rank mismatch, A has rank {a.shape[0]} but B ({roles['b']!r}) "
                            f"has rank {b.shape[1]}")
        if "alpha" in roles:
            alpha = sd[roles["alpha"]]
            if not isinstance(alpha, torch.Tensor) or alpha.numel() != 1:
                raise LoraError(f"{source}: key {roles['alpha']!r}: alpha must be a single number")
            scale = float(alpha.float().item()) / a.shape[0]
        elif cfg is not None:
            scale = _peft_scale(cfg, _write_name(target, False), a.shape[0], where)
        else:
            scale = 1.0
        b = _fold(b, scale)
        if target[1] == QKV:
            if b.shape[0] != 3 * spec.dim:
                raise LoraError(f"{where}: fused qkv B has {b.shape[0]} rows, expected 3 x {spec.dim}")
            found = {(target[0], c): m for c, m in _split_qkv(a, b, spec.dim).items()}
        else:
            found = {target: LoraModule(a, b)}
        for key, m in found.items():
            if key in modules:
                raise LoraError(f"{where}: module {diffusers_name(key)!r} is also given by key "
                                f"{origin[key]!r}")
            Lora({key: m}, spec=spec).validate(where)
            modules[key], origin[key] = m, roles["a"]
    ordered = {k: modules[k] for k in spec.module_keys() if k in modules}
    kept = {k: v for k, v in metadata.items() if k not in _RESERVED}
    return Lora(ordered, {**kept, META_FORMAT: dialect}, spec)


SAFETENSORS_ERRORS = (safetensors.SafetensorError, OSError, RuntimeError, ValueError)


def unreadable(path: Path, exc: Exception) -> LoraError:
    """The one-line error for a safetensors file that failed to open: missing, permission denied, or not
    a safetensors file (safetensors raises FileNotFoundError for a file it may not open too)."""
    if isinstance(exc, FileNotFoundError):
        return LoraError(f"{path}: {open_error(path) or 'no such file'}")
    return LoraError(f"{path}: not a readable .safetensors file (truncated or another format): {exc}")


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; LoraError (naming the file) on any failure."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except SAFETENSORS_ERRORS as e:
        raise unreadable(path, e) from e


def read_lora(path: str | os.PathLike, dialect: str | None = None, spec: ZitSpec | None = None) -> Lora:
    """Read a ZIT LoRA .safetensors file (or a peft folder) of any dialect into the canonical form."""
    path = Path(path)
    if path.is_dir():
        if not (path / "adapter_model.safetensors").is_file():
            raise LoraError(f"{path}: is a directory without an adapter_model.safetensors, not a LoRA file")
        path = path / "adapter_model.safetensors"
    sd, metadata = _load(path)
    peft_config = None
    cfg_path = path.with_name("adapter_config.json")
    if PEFT_META not in metadata and cfg_path.is_file():
        try:
            peft_config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise LoraError(f"{cfg_path}: unreadable adapter config: {e}") from e
    return lora_from_state_dict(sd, metadata, dialect, spec, source=str(path), peft_config=peft_config)
