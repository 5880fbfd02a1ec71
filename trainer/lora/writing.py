"""Write the canonical `Lora` as a .safetensors file in any dialect: one spelling per dialect, alpha = rank,
ComfyUI's fused qkv where the dialect uses it, and never an Inf/NaN (a value that does not fit the output
dtype is refused naming its module). Files are written atomically (temp file + rename)."""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ..files import atomic_write
from .canonical import Lora, LoraError, LoraModule, all_finite
from .formats import _LAYOUTS, _RESERVED, DIALECTS, META_FORMAT, META_SPEC, PEFT_META, QKV, _write_name
from .spec import QKV_SLICE, diffusers_name


def _fuse_qkv(parts: dict[str, LoraModule], dim: int) -> LoraModule:
    """One fused qkv module with dW slices equal to the given q/k/v modules (missing ones: zero rows)."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for m in parts.values() for t in (m.a, m.b)))
    first = next(iter(parts.values())).a.to(dtype)
    if all(torch.equal(m.a.to(dtype), first) for m in parts.values()):
        a = first
        b = torch.zeros(3 * dim, a.shape[0], dtype=dtype)
        for c, m in parts.items():
            b[QKV_SLICE[c] * dim:(QKV_SLICE[c] + 1) * dim] = m.b.to(dtype)
        return LoraModule(a, b)
    a = torch.cat([m.a.to(dtype) for m in parts.values()])
    b = torch.zeros(3 * dim, a.shape[0], dtype=dtype)
    col = 0
    for c, m in parts.items():
        b[QKV_SLICE[c] * dim:(QKV_SLICE[c] + 1) * dim, col:col + m.rank] = m.b.to(dtype)
        col += m.rank
    return LoraModule(a, b)



def _peft_metadata(lora: Lora) -> dict[str, object]:
    """diffusers pipeline `lora_adapter_metadata` (transformer.-prefixed LoraConfig) for alpha = rank."""
    ranks = {diffusers_name(k): m.rank for k, m in lora.modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{name}": rank for name, rank in ranks.items() if rank != r}
    cfg = {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
           "target_modules": sorted(ranks), "use_rslora": False, "bias": "none"}
    return {f"transformer.{k}": v for k, v in cfg.items()}


def _entries(lora: Lora, fused: bool) -> list[tuple[str, LoraModule]]:
    """(dotted module name, module) to write; with `fused`, each block's q/k/v become one qkv module."""
    entries: list[tuple[str, LoraModule]] = []
    done: set[str] = set()
    for key, m in lora.modules.items():
        if not (fused and key[1] in QKV_SLICE):
            entries.append((_write_name(key, fused), m))
        elif key[0] not in done:
            done.add(key[0])
            parts = {c: lora.modules[(key[0], c)] for c in QKV_SLICE if (key[0], c) in lora.modules}
            entries.append((_write_name((key[0], QKV), True), _fuse_qkv(parts, lora.spec.dim)))
    return entries


def _metadata_str(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _not_finite(module: str, source: torch.Tensor, dtype: torch.dtype) -> str:
    """Why a module cannot be written: Inf/NaN already in it, or values too large for the output dtype."""
    name = _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if not all_finite(source.detach()):
        return (f"module {module!r}: its weights are not finite (Inf/NaN), e.g. after scaling by too large a "
                "ratio; nothing written")
    peak = float(source.detach().abs().max())
    return (f"module {module!r}: a value of {peak:.4g} does not fit {name} (largest "
            f"{torch.finfo(dtype).max:.4g}); write it as bf16 or fp32, or scale it down; nothing written")


def lora_to_state_dict(
    lora: Lora, dialect: str = "aitoolkit", dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict and safetensors metadata of `lora` in `dialect` (alpha = rank where it has alphas);
    LoraError naming the module when a value is not finite or does not fit `dtype` (no Inf/NaN is written)."""
    if dialect not in _LAYOUTS:
        raise LoraError(f"unknown dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")
    if not lora.modules:
        raise LoraError("LoRA has no modules: nothing to write")
    lora.validate("LoRA to write", values=False)  # values were checked where they entered (read_lora)
    layout = _LAYOUTS[dialect]
    sd: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def put(key: str, t: torch.Tensor, module: str) -> None:
        cast = t.detach().to("cpu", dtype or t.dtype).contiguous()
        if cast.is_floating_point() and not all_finite(cast):
            raise LoraError(_not_finite(module, t, cast.dtype))
        if cast.data_ptr() in seen:  # safetensors refuses tensors that share memory
            cast = cast.clone()
        seen.add(cast.data_ptr())
        sd[key] = cast

    for name, m in _entries(lora, layout.fused):
        base = layout.prefix + (name.replace(".", "_") if layout.underscore else name)
        put(base + layout.a, m.a, name)
        put(base + layout.b, m.b, name)
        if layout.alpha:
            sd[base + ".alpha"] = torch.tensor(float(m.rank))
    metadata = {k: _metadata_str(v) for k, v in lora.metadata.items() if k not in _RESERVED}
    metadata[META_FORMAT] = dialect
    metadata[META_SPEC] = json.dumps(lora.spec.to_dict())
    if dialect == "diffusers":
        metadata[PEFT_META] = json.dumps(_peft_metadata(lora), sort_keys=True)
    return sd, metadata


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def write_lora(
    lora: Lora,
    path: str | os.PathLike,
    dialect: str = "aitoolkit",
    dtype: torch.dtype | str | None = None,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write `lora` to a .safetensors file in `dialect` atomically (temp file + rename); returns the path."""
    path = Path(path)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise LoraError(f"{path}: unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    try:
        sd, meta = lora_to_state_dict(lora, dialect, dtype)
    except LoraError as e:
        raise LoraError(f"{path}: {e}") from None
    extra = {k: _metadata_str(v) for k, v in (metadata or {}).items() if k not in _RESERVED}
    meta = {**meta, **extra}
    def save(tmp: Path) -> None:
        # Create the temp file ourselves so it gets open()'s mode (0o666 minus the umask), then keep that
        # mode: safetensors may recreate the file as 0o600, which would hide it from other users.
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = os.stat(tmp).st_mode & 0o777
        safetensors.torch.save_file(sd, tmp, metadata=meta)
        os.chmod(tmp, mode)

    try:
        atomic_write(path, save)
    except (OSError, RuntimeError, ValueError, safetensors.SafetensorError) as e:
        raise LoraError(f"{path}: could not write the LoRA: {e}") from e
    return path
