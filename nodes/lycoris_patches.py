"""LyCORIS files (LoKr, LoHa, full diff) for Z-Image as ComfyUI's own weight-adapter patches.

Each module becomes the patch value `comfy.lora.load_lora` builds for the same tensors, holding the file's raw
tensors and alpha, so ComfyUI computes dW itself (in float32) exactly as for its own loader:
- LoKr -> `LoKrAdapter(loaded_keys, (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale))`;
- LoHa -> `LoHaAdapter(loaded_keys, (w1_a, w1_b, alpha, w2_a, w2_b, t1, t2, dora_scale))`;
- full diff -> `("diff", (diff,))`, the patch core uses for `.diff` tensors;
- a plain LoRA module in the same file -> `LoRAAdapter(loaded_keys, (up, down, alpha, None, None, None))`.
(ComfyUI versions before weight adapters take the tuples `("lokr", ...)`, `("loha", ...)`, `("lora", ...)`.)

Keys: a module of a split q/k/v (`attention.to_q`, any naming, musubi's raw `lora_unet_..._to_q` included)
is an offset patch on the fused qkv weight, `(qkv key, (0, row offset, dim))`, as core maps to_q/to_k/to_v
for Z-Image; a module written on ComfyUI's fused `attention.qkv` is one patch on the whole qkv weight.

Weights: the strength times each module's block/component weight goes into `add_patches`' strength, so a
weight of 1 gives exactly core's patch and a weight of 0 gives no patch (the same as the keys deleted).
A fused qkv module whose q, k and v get different weights is split exactly into three row patches, each
at its own weight: LoHa and LoRA by the rows of their up/`_a` factors, a diff by its rows, LoKr by the rows
of w1 when w2's row count divides the head width dim; otherwise that LoKr slice becomes a diff patch of its
raw Kronecker rows with the scale alpha/rank moved into the strength (dim x in float32 per slice in memory).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..trainer.lora.blocks import BlockWeights
from ..trainer.lora.lycoris import DeltaFile, DeltaModule
from ..trainer.lora.spec import QKV_SLICE, ModuleKey, ZitSpec, comfy_name
from .patching import PREFIX, PatchKey, patch_key

Rows = tuple[int, int]
Tensors = dict[str, torch.Tensor]
Groups = dict[float, dict[PatchKey, Any]]


def _adapter_class(kind: str) -> Callable[..., Any] | None:
    """ComfyUI's weight-adapter class for a kind, or None on a ComfyUI before weight adapters."""
    try:
        from comfy.weight_adapter import LoHaAdapter, LoKrAdapter, LoRAAdapter
    except ImportError:
        return None
    return {"lokr": LoKrAdapter, "loha": LoHaAdapter, "lora": LoRAAdapter}[kind]


def patch_value(kind: str, t: Tensors, alpha: float | None) -> Any:
    """The patch value ComfyUI's load_lora builds for one module's raw tensors `t` (part -> tensor)."""
    if kind == "full":
        return ("diff", (t["diff"],))
    if kind == "lokr":
        weights = (t.get("lokr_w1"), t.get("lokr_w2"), alpha, t.get("lokr_w1_a"), t.get("lokr_w1_b"),
                   t.get("lokr_w2_a"), t.get("lokr_w2_b"), None, None)
    elif kind == "loha":
        weights = (t["hada_w1_a"], t["hada_w1_b"], alpha, t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t1"),
                   t.get("hada_t2"), None)
    else:
        weights = (t["lora_up"], t["lora_down"], alpha, None, None, None)
    cls = _adapter_class(kind)
    return (kind, weights) if cls is None else cls(set(), weights)


def _lokr_w2_rows(t: Tensors) -> int:
    return (t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"]).shape[0]


def _kron_rows(m: DeltaModule, t: Tensors, rows: Rows) -> torch.Tensor:
    """Rows of LoKr's unscaled kron(w1, w2) in float32, w1 and w2 formed as ComfyUI forms them."""
    f = {p: x.float() for p, x in t.items()}
    w1 = f["lokr_w1"] if "lokr_w1" in f else torch.mm(f["lokr_w1_a"], f["lokr_w1_b"])
    w2 = f["lokr_w2"] if "lokr_w2" in f else torch.mm(f["lokr_w2_a"], f["lokr_w2_b"])
    b = w2.shape[0]
    i0, i1 = rows[0] // b, -(-rows[1] // b)
    return torch.kron(w1[i0:i1], w2)[rows[0] - i0 * b:rows[1] - i0 * b].contiguous()


def sliced_value(m: DeltaModule, t: Tensors, rows: Rows) -> tuple[Any, float]:
    """(patch value, extra strength factor) of rows r0:r1 of a fused module's dW, exact."""
    r0, r1 = rows
    s = dict(t)
    if m.kind == "full":
        s["diff"] = t["diff"][r0:r1]
    elif m.kind == "lora":
        s["lora_up"] = t["lora_up"][r0:r1]
    elif m.kind == "loha":
        for a, core in (("hada_w1_a", "hada_t1"), ("hada_w2_a", "hada_t2")):
            s[a] = t[a][:, r0:r1] if core in t else t[a][r0:r1]  # Tucker: a's columns are dW's rows
    else:
        b = _lokr_w2_rows(t)
        if r0 % b or r1 % b:  # the slice cuts through w2's row blocks: a diff of the raw rows
            return ("diff", (_kron_rows(m, t, rows),)), m.scale
        w1 = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
        s[w1] = t[w1][r0 // b:r1 // b]
    return patch_value(m.kind, s, m.alpha), 1.0


def _group(delta: DeltaFile) -> list[list[DeltaModule]]:
    """The file's modules, q/k/v of one fused qkv module together (they share their tensors)."""
    out: dict[Any, list[DeltaModule]] = {}
    for key, m in delta.modules.items():
        ident = (key[0], tuple(sorted(m.parts.values()))) if m.rows is not None else key
        out.setdefault(ident, []).append(m)
    return list(out.values())


def delta_patches(delta: DeltaFile, spec: ZitSpec, weights: BlockWeights | None = None) -> Groups:
    """Patch dicts for ModelPatcher.add_patches grouped by strength factor; weight-0 modules get no patch."""
    groups: Groups = {}

    def put(factor: float, key: PatchKey, value: Any) -> None:
        groups.setdefault(factor, {})[key] = value

    def weight(key: ModuleKey) -> float:
        return 1.0 if weights is None else weights.weight(key)

    for ms in _group(delta):
        w = {m.key: weight(m.key) for m in ms}
        if not any(w.values()):
            continue
        t = ms[0].tensors()
        if ms[0].rows is None:
            put(w[ms[0].key], patch_key(ms[0].key, spec), patch_value(ms[0].kind, t, ms[0].alpha))
        elif len(set(w.values())) == 1 and len(ms) == len(QKV_SLICE):
            qkv = f"{PREFIX}{comfy_name(ms[0].key)}.weight"
            put(w[ms[0].key], qkv, patch_value(ms[0].kind, t, ms[0].alpha))
        else:
            for m in ms:
                if w[m.key] != 0:
                    value, factor = sliced_value(m, t, m.rows)
                    put(w[m.key] * factor, patch_key(m.key, spec), value)
    return groups
