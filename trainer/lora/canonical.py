"""The one in-memory form of a ZIT LoRA: per (block, component) module, factors A and B, scale in B."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ZitError
from .spec import ZIT, ModuleKey, ZitSpec, diffusers_name


class LoraError(ZitError):
    """A LoRA file or request we refuse; the message names the file, the key and the problem."""


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in t; a sum is non-finite whenever an element is, so only then run the slow exact test."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


@dataclass
class LoraModule:
    """One low-rank update dW = b @ a; any alpha/rank scale is already folded into b."""

    a: torch.Tensor  # (rank, in_features), the "down" / lora_A factor
    b: torch.Tensor  # (out_features, rank), the "up" / lora_B factor, scale included

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """The full weight update dW in float32."""
        return self.b.float() @ self.a.float()


@dataclass
class Lora:
    """A ZIT LoRA: modules keyed by (block, component), the file's metadata and the model sizes it fits."""

    modules: dict[ModuleKey, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    spec: ZitSpec = ZIT

    def __len__(self) -> int:
        return len(self.modules)

    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    def num_parameters(self) -> int:
        return sum(m.a.numel() + m.b.numel() for m in self.modules.values())

    def validate(self, source: str = "LoRA", values: bool = True) -> None:
        """Check modules exist in the spec with consistent A/B shapes (and, with `values`, finite values)."""
        for key, m in self.modules.items():
            name = diffusers_name(key) if self.spec.has_module(key) else f"{key[0]}.{key[1]}"
            if not self.spec.has_module(key):
                raise LoraError(f"{source}: module {name!r} does not exist in Z-Image-Turbo")
            if m.a.ndim != 2 or m.b.ndim != 2:
                raise LoraError(f"{source}: {name}: A and B must be matrices, got shapes "
                                f"{tuple(m.a.shape)} and {tuple(m.b.shape)}")
            if m.a.shape[0] != m.b.shape[1]:
                raise LoraError(f"{source}: {name}: rank mismatch, A has rank {m.a.shape[0]} "
                                f"but B has rank {m.b.shape[1]}")
            want_out, want_in = self.spec.shape(key)
            if (m.b.shape[0], m.a.shape[1]) != (want_out, want_in):
                raise LoraError(f"{source}: {name}: dW would be {m.b.shape[0]}x{m.a.shape[1]} but the "
                                f"model's weight is {want_out}x{want_in}")
            for side, t in (("A", m.a), ("B", m.b)) if values else ():
                if not all_finite(t):
                    raise LoraError(f"{source}: {name}: {side} contains NaN or Inf values")
