"""Shared by the tests/test_formats_*.py files: a sample LoRA, bit-exact comparisons and raw file access.

Factors are compared bit for bit; identical A and B give identical dW = B @ A, so that is the exact dW check.
Where a conversion changes the factors (fused qkv, alpha folding) dW is computed and compared explicitly.
"""

from __future__ import annotations

import safetensors.torch
import torch

from trainer.lora.canonical import Lora, LoraModule
from trainer.lora.spec import BASE, BASE_MODULES, COMPONENTS, ZIT
from trainer.lora.synth import random_lora

DIM = ZIT.dim
KEYS = [
    *[("L00", c) for c in COMPONENTS],
    ("L01", "q"), ("L01", "k"), ("L01", "v"),  # q/k/v share one A: fused without growing the rank
    ("L02", "q"), ("L02", "v"),  # a partial q/k/v block: zero-padded slice when fused
    ("L29", "out"), ("L29", "w2"),
    ("NR1", "adaLN"), ("NR1", "q"),
    ("CR0", "k"), ("CR0", "w3"),
    *[(BASE, name) for name in BASE_MODULES],
]
LOW_RANK = [("L29", "out"), ("CR0", "k"), (BASE, "cap_embedder.1"), ("L02", "v")]


def sample_lora(dtype: torch.dtype = torch.float32, seed: int = 0) -> Lora:
    """Main, refiner and BASE modules, two ranks, a shared-A q/k/v block and a partial one."""
    lora = random_lora(4, keys=KEYS, seed=seed, dtype=dtype)
    lora.modules.update(random_lora(2, keys=LOW_RANK, seed=seed + 1, dtype=dtype).modules)
    shared = lora.modules[("L01", "q")].a
    for c in "kv":
        lora.modules[("L01", c)] = LoraModule(shared.clone(), lora.modules[("L01", c)].b)
    return lora


def assert_same(want: Lora, got: Lora) -> None:
    """Same module set, dtypes and bit-identical factors (hence bit-identical dW)."""
    assert list(got.modules) == [k for k in ZIT.module_keys() if k in want.modules]
    for key, m in want.modules.items():
        g = got.modules[key]
        assert g.a.dtype == m.a.dtype and g.b.dtype == m.b.dtype, key
        assert torch.equal(g.a, m.a) and torch.equal(g.b, m.b), key


def assert_delta(got: LoraModule, want: torch.Tensor, exact: bool = True) -> None:
    d = got.delta()
    if exact:
        assert torch.equal(d, want)
    else:
        torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-7)


DOWN_UP = (".lora_down.weight", ".lora_up.weight")


def pair(name: str, a: torch.Tensor, b: torch.Tensor, down: str = ".lora_A.weight",
         up: str = ".lora_B.weight") -> dict[str, torch.Tensor]:
    return {name + down: a, name + up: b}


def save(path, sd: dict, metadata: dict | None = None):
    safetensors.torch.save_file({k: v.clone() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def raw(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
