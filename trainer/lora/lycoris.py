"""LyCORIS adapters for Z-Image (LoKr, LoHa, full diff; plain LoRA beside them): read, dW, norms, to LoRA.

dW per module, exactly as ComfyUI patches it (comfy/weight_adapter/lokr.py, loha.py, lora.py and the
"diff" patch in comfy/lora.py), all in float32:
- LoKr: dW = scale * kron(w1, w2) with w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, w2 = lokr_w2 or
  lokr_w2_a @ lokr_w2_b (a lokr_t2 Tucker core is refused: ComfyUI fails on it for a Linear layer);
  scale = alpha / rank with rank = lokr_w1_b's rows, replaced by lokr_w2_b's rows when w2 is decomposed;
  scale 1 without an alpha or when neither w1 nor w2 is decomposed.
- LoHa: dW = scale * (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b), scale = alpha / hada_w1_b's rows
  (1 without alpha); Tucker: each product is einsum("ijkl,jr,ip->prkl", hada_tN, hada_wN_b, hada_wN_a).
- diff: dW = diff (an alpha is ignored). LoRA: dW = alpha / down's rows * up @ down (1 without alpha).
A fused ComfyUI `attention.qkv` module gives q, k and v the row slices 0:dim, dim:2dim, 2dim:3dim.

Tensors stay in the file until a module needs them, and dW is formed one module at a time. The SVD to a
LoRA never forms dW where the structure allows: kron(w1, w2) has the singular values s1_i * s2_j and
vectors kron(u1_i, u2_j); a LoHa (or LoRA) dW is exactly B @ A with inner size r1 * r2 (Khatri-Rao).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch

from .canonical import Lora, LoraError, LoraModule, all_finite
from .formats import _RESERVED, QKV, SAFETENSORS_ERRORS, _spec_from_metadata, unreadable
from .inspect import frobenius_norm
from .lycoris_keys import KINDS, check_group, group_keys, is_lycoris
from .merge import _kept_rank, factor_svd
from .spec import QKV_SLICE, ModuleKey, ZitSpec, diffusers_name

__all__ = ["KINDS", "DeltaFile", "DeltaModule", "delta_from_state_dict", "delta_to_lora", "is_lycoris",
           "module_norms", "read_delta_file"]

Rows = tuple[int, int] | None


class _Store:
    """Tensor shapes from a safetensors header (or a dict), tensors read only on request."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], floating: dict[str, bool],
                 get: Callable[[list[str]], dict[str, torch.Tensor]]):
        self.shapes, self.floating, self.get = shapes, floating, get


def _dict_store(sd: Mapping[str, torch.Tensor], source: str) -> _Store:
    for k, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise LoraError(f"{source}: key {k!r}: not a tensor ({type(t).__name__})")
    floating = {k: t.is_floating_point() for k, t in sd.items()}
    return _Store({k: tuple(t.shape) for k, t in sd.items()}, floating, lambda keys: {k: sd[k] for k in keys})


def _file_store(path: Path) -> tuple[_Store, dict[str, str]]:
    def get(keys: list[str]) -> dict[str, torch.Tensor]:
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in keys}
        except SAFETENSORS_ERRORS as e:
            raise LoraError(f"{path}: could not read tensors {keys}: {e}") from e

    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            slices = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
            floating = {k: s.get_dtype().startswith(("F", "BF")) for k, s in slices.items()}
    except SAFETENSORS_ERRORS as e:
        raise unreadable(path, e) from e
    return _Store(shapes, floating, get), metadata


@dataclass(eq=False)
class DeltaModule:
    """One adapted linear (or one q/k/v slice of a fused qkv): its kind, tensor names, alpha and dW shape."""

    key: ModuleKey
    kind: str  # "lokr" | "loha" | "full" | "lora"
    parts: dict[str, str]  # part (e.g. "lokr_w1", "hada_w2_b", "diff", "lora_up") -> tensor name in the file
    alpha: float | None
    rank: int | None  # the rank alpha is divided by (ComfyUI's rule); None: alpha is ignored
    rows: Rows  # rows of a fused qkv dW this module is, None: the whole dW
    shape: tuple[int, int]  # (out, in) of this module's dW
    source: str = ""
    _store: _Store | None = field(default=None, repr=False)

    @property
    def scale(self) -> float:
        """The factor ComfyUI multiplies the raw product by: alpha / rank, or 1."""
        return self.alpha / self.rank if self.alpha is not None and self.rank is not None else 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        """The raw tensors by part, as stored; LoraError naming the key if any holds NaN or Inf."""
        assert self._store is not None
        raw = self._store.get(list(self.parts.values()))
        for name, t in raw.items():
            if not all_finite(t):
                raise LoraError(f"{self.source}: key {name!r}: contains NaN or Inf values")
        return {part: raw[name] for part, name in self.parts.items()}

    def delta(self) -> torch.Tensor:
        """dW (out, in) in float32, computed as ComfyUI computes it."""
        t = {p: x.float() for p, x in self.tensors().items()}
        r, s = self.rows, self.scale
        if self.kind == "full":
            return _slice(t["diff"], r).clone()
        if self.kind == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else _product(t, "lokr_w2", None)
            out = _kron_rows(w1, w2, r)
        elif self.kind == "loha":
            out = _product(t, "hada_w1", r) * _product(t, "hada_w2", r)
        else:
            out = _slice(t["lora_up"], r) @ t["lora_down"]
        return out if s == 1.0 else out * s

    def _lokr_parts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(w1 rows of this slice * scale, w2) in float64 when dW is their Kronecker product, else None."""
        t = {p: x.double() for p, x in self.tensors().items()}
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else _product(t, "lokr_w2", None)
        b = w2.shape[0]
        if self.rows is not None and (self.rows[0] % b or self.rows[1] % b):
            return None
        rows = None if self.rows is None else (self.rows[0] // b, self.rows[1] // b)
        return _slice(w1, rows) * self.scale, w2

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) in float64 with B @ A = dW and a small inner size (LoHa, LoRA), else None."""
        if self.kind not in ("loha", "lora"):
            return None
        t = {p: x.double() for p, x in self.tensors().items()}
        if self.kind == "lora":
            b, a = _slice(t["lora_up"], self.rows), t["lora_down"]
        else:
            (b1, a1), (b2, a2) = _pair(t, "hada_w1", self.rows), _pair(t, "hada_w2", self.rows)
            b = (b1[:, :, None] * b2[:, None, :]).reshape(b1.shape[0], -1)
            a = (a1[:, None, :] * a2[None, :, :]).reshape(-1, a1.shape[1])
        if a.shape[0] >= min(self.shape):
            return None
        return b * self.scale, a

    def norm(self) -> float:
        """||dW||_F, from the structure where it allows (exact), else from dW itself."""
        if self.kind == "lokr" and (parts := self._lokr_parts()) is not None:
            return float(parts[0].norm() * parts[1].norm())
        if (fa := self.factors()) is not None:
            return frobenius_norm(*fa)
        return float(torch.linalg.vector_norm(self.delta(), dtype=torch.float64))

    def svdvals(self) -> torch.Tensor:
        """Singular values of dW (float64, descending), from the structure where it allows."""
        return _spectrum(self)[0].sqrt()


def _slice(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x if rows is None else x[rows[0]:rows[1]]


def _kron_rows(w1: torch.Tensor, w2: torch.Tensor, rows: Rows) -> torch.Tensor:
    """torch.kron(w1, w2)[rows], forming only the row blocks of w1 those rows need."""
    if rows is None:
        return torch.kron(w1, w2)
    b = w2.shape[0]
    i0, i1 = rows[0] // b, -(-rows[1] // b)
    return torch.kron(w1[i0:i1], w2)[rows[0] - i0 * b:rows[1] - i0 * b]


def _product(t: dict[str, torch.Tensor], n: str, rows: Rows) -> torch.Tensor:
    """`n_a @ n_b` (rows of it), or with a Tucker core ComfyUI's einsum; n is e.g. "hada_w1"."""
    a, b = t[f"{n}_a"], t[f"{n}_b"]
    core = t.get({"hada_w1": "hada_t1", "hada_w2": "hada_t2"}.get(n, ""))
    if core is None:
        return _slice(a, rows) @ b
    a = a if rows is None else a[:, rows[0]:rows[1]]
    return torch.einsum("i j k l, j r, i p -> p r k l", core, b, a)[:, :, 0, 0]


def _pair(t: dict[str, torch.Tensor], n: str, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with left @ right = _product(t, n, rows); a (i, j, 1, 1) Tucker core joins the left."""
    a, b = t[f"{n}_a"], t[f"{n}_b"]
    core = t.get({"hada_w1": "hada_t1", "hada_w2": "hada_t2"}[n])
    if core is None:
        return _slice(a, rows), b
    a = a if rows is None else a[:, rows[0]:rows[1]]
    return a.T @ core[:, :, 0, 0], b


@dataclass
class DeltaFile:
    """A LyCORIS file read for Z-Image: its modules by canonical key, metadata and model sizes."""

    modules: dict[ModuleKey, DeltaModule]
    metadata: dict[str, str]
    spec: ZitSpec
    source: str = "LyCORIS file"

    def __len__(self) -> int:
        return len(self.modules)

    def kinds(self) -> dict[str, int]:
        """How many modules of each kind (lokr, loha, full, lora)."""
        return dict(Counter(m.kind for m in self.modules.values()))

    def num_parameters(self) -> int:
        """Numbers in the adapter tensors (a fused qkv's tensors once, alphas not counted); header only."""
        sizes = {name: math.prod(m._store.shapes[name]) for m in self.modules.values() if m._store
                 for name in m.parts.values()}
        return sum(sizes.values())


def _read(store: _Store, metadata: Mapping[str, str], spec: ZitSpec | None, source: str) -> DeltaFile:
    keys = list(store.shapes)
    if not keys:
        raise LoraError(f"{source}: contains no tensors")
    spec = spec or _spec_from_metadata(metadata, source)
    modules: dict[ModuleKey, DeltaModule] = {}
    origin: dict[ModuleKey, str] = {}
    for g in group_keys(keys, spec, source).values():
        for k in g.parts.values():
            if not store.floating[k]:
                raise LoraError(f"{source}: key {k!r}: a LyCORIS tensor must be floating point")
        (out, inp), rank = check_group(g, store.shapes.__getitem__, spec, source)
        alpha = None
        if g.alpha is not None:
            if math.prod(store.shapes[g.alpha]) != 1:
                raise LoraError(f"{source}: key {g.alpha!r}: alpha must be a single number, got shape "
                                f"{store.shapes[g.alpha]}")
            alpha = float(store.get([g.alpha])[g.alpha].item())
        if g.target[1] == QKV:
            d = spec.dim
            found = {(g.target[0], c): ((i * d, (i + 1) * d), (d, inp)) for c, i in QKV_SLICE.items()}
        else:
            found = {g.target: (None, (out, inp))}
        for key, (rows, shape) in found.items():
            if key in modules:
                raise LoraError(f"{source}: key {next(iter(g.parts.values()))!r}: module "
                                f"{diffusers_name(key)!r} is also given by {origin[key]!r}")
            modules[key] = DeltaModule(key, g.kind, dict(g.parts), alpha, rank, rows, shape, source, store)
            origin[key] = next(iter(g.parts.values()))
    ordered = {k: modules[k] for k in spec.module_keys() if k in modules}
    return DeltaFile(ordered, dict(metadata), spec, source)


def delta_from_state_dict(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                          spec: ZitSpec | None = None, source: str = "state dict") -> DeltaFile:
    """Read an in-memory LyCORIS state dict (LoKr / LoHa / diff, any Z-Image naming) into a DeltaFile."""
    return _read(_dict_store(sd, source), metadata or {}, spec, source)


def read_delta_file(path: str | os.PathLike, spec: ZitSpec | None = None) -> DeltaFile:
    """Read a LyCORIS .safetensors file's header into a DeltaFile; tensors are read as modules need them."""
    path = Path(path)
    store, metadata = _file_store(path)
    return _read(store, metadata, spec, str(path))


def module_norms(delta_file: DeltaFile) -> dict[ModuleKey, float]:
    """||dW||_F of every module (exact; one module in memory at a time)."""
    return {key: m.norm() for key, m in delta_file.modules.items()}


Spectrum = tuple[torch.Tensor, Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def _spectrum(m: DeltaModule) -> Spectrum:
    """Squared singular values of dW (descending, float64) and a function giving the top-k (U, S, Vh)."""
    if m.kind == "lokr" and (parts := m._lokr_parts()) is not None:
        u1, s1, v1 = torch.linalg.svd(parts[0], full_matrices=False)
        u2, s2, v2 = torch.linalg.svd(parts[1], full_matrices=False)
        prod = (s1[:, None] * s2[None, :]).flatten()
        order = torch.argsort(prod, descending=True, stable=True)

        def take_kron(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            i, j = order[:k] // len(s2), order[:k] % len(s2)
            u = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(-1, k)
            vh = (v1[i][:, :, None] * v2[j][:, None, :]).reshape(k, -1)
            return u, prod[order[:k]], vh

        return prod[order].square(), take_kron
    fa = m.factors()
    if fa is not None:
        u, s, vh = factor_svd(*fa)
    else:
        u, s, vh = torch.linalg.svd(m.delta(), full_matrices=False)
    return s.double().square(), lambda k: (u[:, :k], s[:k], vh[:k])


def delta_to_lora(delta_file: DeltaFile, rank: int | None = None, energy: float | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[Lora, dict[str, float]]:
    """Best rank-k LoRA of every module's dW: k = `rank`, or the least k keeping >= `energy` of sum s^2
    (with both, the smaller). Returns the LoRA and ||dW - B A||_F / ||dW||_F per module name.

    B = U_k sqrt(S_k), A = sqrt(S_k) Vh_k. k never exceeds dW's numerical rank (singular values above
    s_max * max(out, in) * float64 eps), so a LoKr of rank 8 asked for rank 64 gives rank 8, not 56 columns
    of rounding noise. A module whose dW is exactly zero is left out (error 0).
    """
    if rank is None and energy is None:
        raise LoraError(f"{delta_file.source}: converting to a LoRA needs a target rank, an energy "
                        f"fraction, or both")
    if rank is not None and rank < 1:
        raise LoraError(f"{delta_file.source}: rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise LoraError(f"{delta_file.source}: energy must be in (0, 1], got {energy}")
    modules: dict[ModuleKey, LoraModule] = {}
    errors: dict[str, float] = {}
    for key, m in delta_file.modules.items():
        sq, take = _spectrum(m)
        total = float(sq.sum())
        if total == 0:
            errors[diffusers_name(key)] = 0.0
            continue
        k, _ = _kept_rank(sq, rank, energy)
        floor = float(sq[0]) * (max(m.shape) * torch.finfo(torch.float64).eps) ** 2
        k = max(1, min(k, int((sq > floor).sum())))
        u, s, vh = take(k)
        root = s.double().sqrt()
        modules[key] = LoraModule((root[:, None] * vh.double()).to(dtype), (u.double() * root).to(dtype))
        errors[diffusers_name(key)] = math.sqrt(max(0.0, float(sq[k:].sum())) / total)
    kept = {k: v for k, v in delta_file.metadata.items() if k not in _RESERVED}
    kept["zit.convert"] = json.dumps({"from": delta_file.kinds(), "rank": rank, "energy": energy})
    lora = Lora(modules, kept, delta_file.spec)
    lora.validate(delta_file.source)
    return lora, errors
