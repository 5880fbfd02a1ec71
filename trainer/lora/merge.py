"""Merge N ZIT LoRAs, each with its own BlockWeights: exactly (concatenated factors) or SVD-truncated.

The exact merge of inputs i with weights w_i is, per module, A = [A_1; A_2; ...] and
B = [w_1 B_1, w_2 B_2, ...], so B A = sum_i w_i B_i A_i with no cross terms; its rank is the sum of the
contributing ranks. The SVD merge truncates that sum by its singular values, found from the factors
(see factor_svd) without ever forming the out x in matrix dW. A single input with an SVD merge is a
rank resize.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .blocks import BlockWeights
from .canonical import Lora, LoraError, LoraModule
from .spec import ModuleKey, ZitSpec

MergeItem = tuple[Lora, BlockWeights]
NAME_KEYS = ("zit.name", "name", "ss_output_name", "modelspec.title")


@dataclass(frozen=True)
class ModuleReport:
    """What an SVD merge kept of one module: rank, share of squared singular values, relative error."""

    rank: int  # kept rank k
    input_rank: int  # R, the rank of the exact merge (sum of the contributing ranks)
    energy: float  # sum_{i<k} s_i^2 / sum_i s_i^2 (1 when dW is zero)
    rel_error: float  # ||dW - dW_k||_F / ||dW||_F = sqrt(sum_{i>=k} s_i^2 / sum_i s_i^2)


def _qr_core(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Qb, C, Qa) in float64 with b @ a = Qb @ C @ Qa.T and C at most R x R."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    return qb, rb @ ra.T, qa


def factor_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (U, S, Vh) of dW = b @ a in float64, through QR of both factors and an SVD of the core."""
    qb, core, qa = _qr_core(b, a)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return qb @ u, s, vh @ qa.T


def factor_svdvals(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The exact singular values of dW = b @ a (float64, descending) without forming dW."""
    return torch.linalg.svdvals(_qr_core(b, a)[1])


def _spec(items: Sequence[MergeItem]) -> ZitSpec:
    if not items:
        raise LoraError("merge: no inputs")
    spec = items[0][0].spec
    for i, (lora, _) in enumerate(items[1:], start=2):
        if lora.spec != spec:
            raise LoraError(f"merge: input {i} is for a model with sizes {lora.spec.to_dict()}, "
                            f"input 1 for {spec.to_dict()}")
    return spec


def _dtype(items: Sequence[MergeItem]) -> torch.dtype:
    for lora, _ in items:
        for m in lora.modules.values():
            return m.b.dtype
    return torch.float32


def _keys(items: Sequence[MergeItem], spec: ZitSpec) -> list[ModuleKey]:
    """Every module of any input, in the spec's order (keys the spec lacks last, as first seen)."""
    present = dict.fromkeys(key for lora, _ in items for key in lora.modules)
    ordered = [key for key in spec.module_keys() if key in present]
    return ordered + [key for key in present if not spec.has_module(key)]


def _concat(
    items: Sequence[MergeItem], key: ModuleKey, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A_cat, B_cat) in `dtype` over the inputs that have `key` with a non-zero weight, or None.

    w * B is computed in float32 internally and rounded once to `dtype`, as a float32 detour would.
    """
    a_parts, b_parts, first = [], [], None
    for i, (lora, weights) in enumerate(items, start=1):
        m = lora.modules.get(key)
        w = weights.weight(key)
        if m is None or w == 0:
            continue
        shape = (m.b.shape[0], m.a.shape[1])
        first = first or (i, shape)
        if shape != first[1]:
            raise LoraError(f"merge: module {key[0]}.{key[1]} has dW shape {shape[0]}x{shape[1]} in "
                            f"input {i} but {first[1][0]}x{first[1][1]} in input {first[0]}")
        a_parts.append(m.a.to(dtype))
        b_parts.append((m.b * w).to(dtype) if m.b.dtype == dtype else m.b.float().mul(w).to(dtype))
    if not a_parts:
        return None
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def _rank_of(lora: Lora) -> int | list[int] | None:
    ranks = sorted(lora.ranks())
    return ranks[0] if len(ranks) == 1 else (ranks or None)


def _recipe(items: Sequence[MergeItem], method: str, **options: float | int | None) -> str:
    inputs = [
        {
            "name": next((lora.metadata[k] for k in NAME_KEYS if lora.metadata.get(k)), None),
            "ratio": w.ratio,
            "blocks": w.vector_string(),
            "components": w.components_string(),
            "rank": _rank_of(lora),
        }
        for lora, w in items
    ]
    return json.dumps({"method": method, **options, "inputs": inputs})


def _merged(
    items: Sequence[MergeItem], dtype: torch.dtype = torch.float32
) -> Iterable[tuple[ModuleKey, torch.Tensor, torch.Tensor]]:
    for key in _keys(items, _spec(items)):
        pair = _concat(items, key, dtype)
        if pair is not None:
            yield key, pair[0], pair[1]


def merge_exact(items: Sequence[MergeItem], dtype: torch.dtype | None = None) -> Lora:
    """Sum of w_i B_i A_i as concatenated factors (rank = sum of contributing ranks); metadata zit.merge."""
    spec, out = _spec(items), dtype or _dtype(items)
    modules = {key: LoraModule(a, b) for key, a, b in _merged(items, out)}
    return Lora(modules, {"zit.merge": _recipe(items, "exact")}, spec)


def _kept_rank(sq: torch.Tensor, rank: int | None, energy: float | None) -> tuple[int, torch.Tensor]:
    """Kept rank k and the cumulative energy fractions of the squared singular values `sq`."""
    cum = torch.cumsum(sq, 0)
    frac = cum / cum[-1] if cum[-1] > 0 else torch.ones_like(cum)
    k = len(sq) if rank is None else min(rank, len(sq))
    if energy is not None:
        k = min(k, int(torch.searchsorted(frac, torch.tensor([energy], dtype=frac.dtype))) + 1)
    return k, frac


def _truncate(a: torch.Tensor, b: torch.Tensor, rank: int | None,
              energy: float | None) -> tuple[torch.Tensor, torch.Tensor, ModuleReport]:
    """Best rank-k factors (B = U sqrt(S), A = sqrt(S) Vh, in float64) of b @ a and their report."""
    u, s, vh = factor_svd(b, a)
    sq = s.square()
    k, frac = _kept_rank(sq, rank, energy)
    total = float(sq.sum())
    rel = (float(sq[k:].sum()) / total) ** 0.5 if total > 0 else 0.0
    root = s[:k].sqrt()
    report = ModuleReport(rank=k, input_rank=a.shape[0], energy=float(frac[k - 1]), rel_error=rel)
    return root[:, None] * vh[:k], u[:, :k] * root, report


def _check_target(rank: int | None, energy: float | None) -> None:
    if rank is None and energy is None:
        raise LoraError("merge_svd: give a target rank, an energy fraction, or both")
    if rank is not None and rank < 1:
        raise LoraError(f"merge_svd: rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise LoraError(f"merge_svd: energy must be in (0, 1], got {energy}")


def merge_svd(
    items: Sequence[MergeItem],
    rank: int | None = None,
    energy: float | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Lora, dict[ModuleKey, ModuleReport]]:
    """The exact merge truncated per module to `rank` and/or the least rank keeping >= `energy` of sum s^2.

    With both given the smaller rank wins. The kept factors split the singular values evenly,
    B = U_k sqrt(S_k) and A = sqrt(S_k) Vh_k, so both sides have the same scale (kinder to bf16).
    """
    _check_target(rank, energy)
    spec, out = _spec(items), dtype or _dtype(items)
    modules, reports = {}, {}
    for key, a, b in _merged(items):
        a_k, b_k, reports[key] = _truncate(a, b, rank, energy)
        modules[key] = LoraModule(a_k.to(out), b_k.to(out))
    recipe = _recipe(items, "svd", rank=rank, energy=energy)
    return Lora(modules, {"zit.merge": recipe}, spec), reports


def merge_recipe(lora: Lora) -> dict | None:
    """The zit.merge recipe of a merged LoRA as a dict, or None when it has none."""
    try:
        return json.loads(lora.metadata["zit.merge"])
    except (KeyError, json.JSONDecodeError):
        return None

