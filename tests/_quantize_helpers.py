"""What the quantized-base tests (test_quantize*.py) share: ComfyUI-style quantized files written from a
model, and a model's velocity on seeded latents for the given prompt embeddings.

Quantized files are written in ComfyUI's NextDiT layout (`to_comfy_state_dict`), with the block Linears
quantized per tensor the way ComfyUI's converters do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from trainer import model as M
from trainer.model.quantize import FP8

F32 = torch.float32
E5M2 = torch.float8_e5m2

# The ComfyUI (fused) names of the block Linears that QUANTIZED_MODULES stores quantized.
COMFY_BLOCK_LINEAR = re.compile(
    r"(?:layers|noise_refiner|context_refiner)\.\d+\.(?:attention\.(?:qkv|out)|feed_forward\.w[123])"
)


def quantize_per_tensor(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, 0-dim float32 scale) as ComfyUI's converters store a per-tensor quantized weight."""
    if fmt == "int8_tensorwise":
        scale = w.abs().max().float() / 127
        return (w / scale).round().clamp(-127, 127).to(torch.int8), scale
    dtype = FP8 if fmt == "float8_e4m3fn" else E5M2
    scale = w.abs().max().float() / torch.finfo(dtype).max
    return (w / scale).to(dtype), scale


Stored = dict[str, tuple[torch.Tensor, torch.Tensor]]


def write_quantized(path: Path, model: nn.Module, layout: str, fmt: str = "float8_e4m3fn", prefix: str = "",
                    metadata: bool = True, markers: bool = False) -> Stored:
    """Write `model` as a ComfyUI file whose block Linears are quantized; returns {comfy key: (q, scale)}.

    layout: "fp8" (plain cast, no scales), "scaled_fp8" (scaled_fp8 marker + scale_weight + scale_input) or
    "comfy_quant" (weight_scale + `_quantization_metadata` when `metadata`, `<layer>.comfy_quant` tensors
    when `markers`).
    """
    out, stored, layers = {}, {}, {}
    for key, w in M.to_comfy_state_dict(model.state_dict(), prefix).items():
        layer = key[: -len(".weight")]
        if not (key.endswith(".weight") and COMFY_BLOCK_LINEAR.fullmatch(layer[len(prefix):])):
            out[key] = w.contiguous()
            continue
        if layout == "fp8":
            q, scale = w.clamp(-448, 448).to(FP8), torch.tensor(1.0)
        else:
            q, scale = quantize_per_tensor(w, fmt)
        out[key] = q
        stored[key[len(prefix):]] = (q, scale)
        if layout == "scaled_fp8":
            out[f"{layer}.scale_weight"] = scale.reshape(1)
            out[f"{layer}.scale_input"] = torch.ones(1)
        elif layout == "comfy_quant":
            out[f"{layer}.weight_scale"] = scale
            layers[layer] = {"format": fmt}
            if markers:
                out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()),
                                                           dtype=torch.uint8)
    if layout == "scaled_fp8":
        out[f"{prefix}scaled_fp8"] = torch.empty(0, dtype=FP8)
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file(out, str(path), metadata=meta if layout == "comfy_quant" and metadata else None)
    return stored


def velocity(model: nn.Module, embeds: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    """What `model` predicts for seeded 8x8 latents at sigma 0.3 (and 0.9) for one (or two) prompts."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(embeds), 16, 8, 8, generator=gen)
    return M.predict_velocity(model, latents, torch.tensor([0.3, 0.9][: len(embeds)]), embeds)
