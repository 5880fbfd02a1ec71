"""The `lora` commands' reader: a plain LoRA (`Lora`) or a LyCORIS file (`DeltaFile`: LoKr, LoHa, diff),
told apart by the tensor names in the header; the SVD that makes a LoRA of a LyCORIS file at a chosen rank
or energy with its error report; and the per-module stats `lora inspect` shows for one.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import safetensors
import torch

from .canonical import Lora, LoraError
from .formats import read_lora
from .inspect import Stat, block_grid, effective_rank
from .lycoris import DeltaFile, delta_to_lora, is_lycoris, module_norms, read_delta_file
from .spec import BASE, ModuleKey, ZitSpec, diffusers_name

KIND_NAMES = {"lokr": "LoKr", "loha": "LoHa", "full": "full diff", "lora": "LoRA"}
KIND_LETTERS = {"lokr": "K", "loha": "H", "full": "D", "lora": "L"}
TARGET_HINT = "give --rank N or --energy F (0<F<=1) to turn it into a LoRA by SVD"


def header_keys(path: str | os.PathLike) -> list[str] | None:
    """Tensor names from a .safetensors header, or None when it is no readable file (the reader says why)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError):
        return None


def file_is_lycoris(path: str | os.PathLike) -> bool:
    """True when `path` is a .safetensors file with LoKr, LoHa or full-diff tensors (header only)."""
    p = Path(path)
    keys = header_keys(p) if p.is_file() else None
    return keys is not None and is_lycoris(keys)


def read_any(path: str | os.PathLike, dialect: str | None = None,
             spec: ZitSpec | None = None) -> Lora | DeltaFile:
    """A LyCORIS file as a DeltaFile (header only until needed), anything else through `read_lora`."""
    if not file_is_lycoris(path):
        return read_lora(path, dialect, spec)
    if dialect not in (None, "lycoris"):
        raise LoraError(f"{path}: a LyCORIS (LoKr/LoHa/diff) file, but the dialect {dialect!r} given is for "
                        f"plain LoRA files; leave it out (LyCORIS names are detected)")
    return read_delta_file(path, spec)


def kinds_text(delta_file: DeltaFile) -> str:
    """`LoKr 2, LoHa 1`: how many modules of each kind."""
    kinds = delta_file.kinds()
    return ", ".join(f"{name} {kinds[k]}" for k, name in KIND_NAMES.items() if k in kinds)


def check_target(rank: int | None, energy: float | None) -> None:
    """Refuse a target rank below 1 or an energy fraction outside (0, 1] before any file is read."""
    if rank is not None and rank < 1:
        raise LoraError(f"--rank {rank}: must be at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise LoraError(f"--energy {energy:g}: must be in (0, 1]")


def to_lora(item: Lora | DeltaFile, source: str | os.PathLike, rank: int | None = None,
            energy: float | None = None) -> tuple[Lora, dict[str, float] | None]:
    """(LoRA, per-module relative error or None): a LoRA as it is, a LyCORIS file by SVD to rank/energy.

    A target with a plain LoRA is refused (it converts nothing), as is a LyCORIS file without one;
    `source` (the file) names the input in the message.
    """
    if isinstance(item, Lora):
        if rank is not None or energy is not None:
            raise LoraError(f"{source}: a plain LoRA; --rank/--energy only convert LoKr/LoHa/diff files (to "
                            f"resize a LoRA: `lora merge {source} -o OUT --mode svd --rank N`)")
        return item, None
    if rank is None and energy is None:
        raise LoraError(f"{source}: a LyCORIS file ({kinds_text(item)}); {TARGET_HINT}")
    check_target(rank, energy)
    return delta_to_lora(item, rank, energy)


def error_report(delta_file: DeltaFile, lora: Lora, errors: dict[str, float], rank: int | None,
                 energy: float | None, worst: int = 5) -> str:
    """Summary line (target, kept ranks, mean and max relative error) and the `worst` modules' errors."""
    ranks = {diffusers_name(k): m.rank for k, m in lora.modules.items()}
    kept = sorted(set(ranks.values())) or [0]
    target = ", ".join(t for t in (rank and f"rank {rank}", energy and f"energy {energy:g}") if t)
    mean, top = sum(errors.values()) / max(1, len(errors)), max(errors.values(), default=0.0)
    kept_text = str(kept[0]) if len(kept) == 1 else f"{kept[0]}..{kept[-1]}"
    lines = [f"{delta_file.source}: {kinds_text(delta_file)} -> LoRA by SVD ({target}; kept rank "
             f"{kept_text}): relative error ||dW - BA||_F/||dW||_F mean {mean:.4g}, max {top:.4g} over "
             f"{len(errors)} modules"]
    rows = sorted(errors.items(), key=lambda kv: kv[1], reverse=True)[:worst]
    width = max(len("worst modules"), *(len(n) for n, _ in rows)) if rows else 0
    lines.append(f"  {'worst modules'.ljust(width)}  rank  rel. error")
    for name, err in rows:
        lines.append(f"  {name.ljust(width)}  {str(ranks.get(name, '-')).rjust(4)}  {err:>10.4g}")
    return "\n".join(lines)


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above s_max * max(out, in) * float32 eps (numpy's matrix_rank rule for float32)."""
    s = singular_values.double()
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    return int((s > float(s[0]) * max(shape) * torch.finfo(torch.float32).eps).sum())


def delta_stats(delta_file: DeltaFile) -> dict[ModuleKey, Stat]:
    """Norm (exact, `module_norms`), effective rank and numerical rank of every module's real dW."""
    norms = module_norms(delta_file)
    stats = {}
    for key, m in delta_file.modules.items():
        s = m.svdvals()
        stats[key] = Stat(norms[key], effective_rank(s), numerical_rank(s, m.shape))
    return stats


def describe(delta_file: DeltaFile) -> str:
    """Header line, every module's adapter kind as a blocks x components grid, and BASE modules' kinds."""
    scales = Counter(m.scale for m in delta_file.modules.values())
    scale_text = ", ".join(f"{s:.4g} ({n} module{'s' * (n != 1)})" for s, n in sorted(scales.items()))
    legend = ", ".join(f"{KIND_LETTERS[k]} = {v}" for k, v in KIND_NAMES.items())
    lines = [f"{delta_file.source}: LyCORIS file, {len(delta_file)} modules ({kinds_text(delta_file)}), "
             f"{delta_file.num_parameters():,} parameters, scale alpha/rank {scale_text}",
             f"Adapter per module ({legend})"]
    cells = {k: KIND_LETTERS[m.kind] for k, m in delta_file.modules.items()}
    lines += block_grid(delta_file.spec, cells)
    base = [f"{c} {cells[(b, c)]}" for b, c in delta_file.modules if b == BASE]
    if base:
        lines.append("BASE modules: " + ", ".join(base))
    return "\n".join(lines)
