"""Random ZIT LoRAs with the real module names and shapes, for tests, benchmarks and the demo."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .canonical import Lora, LoraModule
from .spec import BASE, ZIT, ModuleKey, ZitSpec


def random_lora(
    rank: int = 4,
    spec: ZitSpec = ZIT,
    keys: Iterable[ModuleKey] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float = 0.02,
) -> Lora:
    """A LoRA on `keys` (default: every block module, no BASE modules) with seeded Gaussian factors."""
    gen = torch.Generator().manual_seed(seed)
    if keys is None:
        keys = [k for k in spec.module_keys() if k[0] != BASE]
    modules = {}
    for key in keys:
        out_f, in_f = spec.shape(key)
        a = torch.randn(rank, in_f, generator=gen) * std
        b = torch.randn(out_f, rank, generator=gen) * std
        modules[key] = LoraModule(a.to(dtype), b.to(dtype))
    return Lora(modules, {}, spec)
