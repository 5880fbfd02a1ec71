"""Real models, inputs and configs shared by the memory planner tests (tests/test_memory_*.py).

Real models: the diffusers transformer at tiny width (dim 64, 2 main layers so that a first block, whose
input needs no gradient, and a following one are both measured, 1 noise + 1 context refiner) and at ZIT's
full width (dim 3840, 1 or 2 main layers, no refiners), a few tokens, bf16 weights with fp32 LoRA under
CPU autocast, as the trainer runs them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.config import config_from_dict
from trainer.lora.spec import ZitSpec
from trainer.model import build_transformer, inject_lora
from trainer.model.quantize import quantize_transformer_fp8

TINY2 = ZitSpec(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, cap_feat_dim=32, in_channels=16)
# Full width without refiners (the tiny cases cover them): every full-width block costs seconds on CPU.
WIDE = ZitSpec(dim=3840, n_layers=2, n_refiner_layers=0, n_heads=30, cap_feat_dim=32, in_channels=16)
WIDE1 = dataclasses.replace(WIDE, n_layers=1)
LATENT, TEXT = 8, 32  # an 8x8 latent = 16 image tokens (padded to 32); a 32-token caption
RANK = 4


def _cfg(**sections: dict) -> object:
    base = {"model": {"transformer": "tiny"}, "data": {"dataset": "images"}, "preview": {"every": 0}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return config_from_dict(base)


def _nbytes(tensors) -> int:
    """Bytes of the distinct storages of these tensors."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _model(spec: ZitSpec, dtype: torch.dtype = torch.bfloat16, *, fp8: bool = False,
           targets: str | None = None, checkpointing: bool = False) -> torch.nn.Module:
    """A real transformer as the trainer holds it: frozen base in dtype (fp8 blocks if asked), fp32 LoRA."""
    torch.manual_seed(0)
    if spec.dim > 256:  # full width: skip the random init, values do not change any size
        model = build_transformer(spec).to(dtype).to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(0.02)
    else:
        model = build_transformer(spec, "cpu").to(dtype)
    model.requires_grad_(False)
    if fp8:
        quantize_transformer_fp8(model, dtype)
    if targets:
        inject_lora(model, RANK, float(RANK), targets)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model.train()


def _inputs(spec: ZitSpec) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, spec.in_channels, LATENT, LATENT, generator=gen)
    return latents, torch.tensor([0.5]), [torch.randn(TEXT, spec.cap_feat_dim, generator=gen)]


def _autocast(dtype: torch.dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32)


def _weights(module: torch.nn.Module) -> int:
    return _nbytes([*module.parameters(), *module.buffers()])


@pytest.fixture(scope="module")
def wide_fp8() -> tuple[torch.nn.Module, int, int]:
    """A full-width one-block transformer: its bf16 bytes, then quantized to fp8 (shared: ~4 s a block)."""
    model = _model(WIDE1)
    bf16 = _weights(model)
    quantize_transformer_fp8(model, torch.bfloat16)
    return model, bf16, _weights(model)
