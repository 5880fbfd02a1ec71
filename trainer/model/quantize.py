"""Quantized storage of the frozen base: fp8 block weights dequantized one Linear at a time in forward.

What is stored in fp8 (float8_e4m3fn) and why: only the seven big Linear weights of every transformer
block (attention to_q/to_k/to_v/to_out.0 and feed_forward w1/w2/w3 of the 30 main layers and the 4
refiners), which are 98% of the parameters. The embedders (x, t, caption), every norm, every adaLN
modulation (its output scales and gates every block), the final layer and the pad tokens stay in the
compute dtype: they are small and numerically delicate.

Scale: one float32 scale per output channel (row), `scale = amax(|row|) / 448`. A per-tensor scale is set
by the single largest weight of a 3840x10240 matrix; per row, each output feature uses the full fp8 range
(what ai-toolkit's qfloat8 and torchao's per-row float8 do). The scales cost 4 bytes per output feature
(0.1% of the fp8 bytes). Pre-quantized files with a per-tensor scale keep it (a (1, 1) scale).

nf4 / int8 storage swaps the same Linears for bitsandbytes' Linear4bit / Linear8bitLt (an optional extra:
`pip install bitsandbytes`) and flags the model `is_loaded_in_4bit` / `is_loaded_in_8bit`, so peft wraps
them with its QLoRA layers.
"""

from __future__ import annotations

import re
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .headers import ModelLoadError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
QUANTIZED_MODULES = re.compile(
    r"(?:layers|noise_refiner|context_refiner)\.\d+\.(?:attention\.(?:to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123])"
)
"""Full diffusers names of the Linear modules whose weights are stored quantized (fullmatch)."""


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 per-row scale of shape (out, 1)) with `weight ~= q.float() * scale`."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`q * scale` computed in float32, returned in `dtype` (scale: per tensor or per row)."""
    return (q.float() * scale.float()).to(dtype)


class _Fp8Matmul(torch.autograd.Function):
    """`x @ dequantize(q, scale).T + bias`, saving the fp8 weight (not a dequantized copy) for backward.

    Autograd would otherwise keep every dequantized weight until backward (one block's with gradient
    checkpointing, the whole model in the compute dtype without). Backward dequantizes again; only the input
    gets a gradient (the base is frozen).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        return F.linear(x, dequantize(q, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        q, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        return grad.matmul(dequantize(q, scale, grad.dtype)), None, None, None


class Fp8Linear(nn.Linear):
    """A frozen Linear whose weight is stored in fp8 with a float32 scale; forward dequantizes it on the fly.

    It stays an `nn.Linear` so peft wraps it like any Linear; `compute_dtype` tells peft which dtype its LoRA
    weights take (instead of fp8). Backward flows to the input (and to LoRAs on top), never to the weight;
    autograd keeps the fp8 weight, not a dequantized copy (`_Fp8Matmul`).
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = q.shape
        self.weight = nn.Parameter(q, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.register_buffer("weight_scale", scale.float().reshape(-1, 1) if scale.numel() > 1
                             else scale.float().reshape(1, 1))
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype) -> Fp8Linear:
        """Quantize a Linear's weight per row; the bias is kept in the compute dtype."""
        q, scale = quantize_fp8(linear.weight.detach())
        return cls(q, scale, None if linear.bias is None else linear.bias.detach(), compute_dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in `dtype` (default: the compute dtype)."""
        return dequantize(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.is_floating_point() else self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return _Fp8Matmul.apply(x.to(dtype), self.weight, self.weight_scale, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3fn, per-row scale"


def quantize_transformer_fp8(model: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Replace the big block Linears (QUANTIZED_MODULES) by Fp8Linear in place; returns their names.

    Call before any LoRA is injected: peft then wraps the Fp8Linear modules.
    """
    names = [n for n, m in model.named_modules() if QUANTIZED_MODULES.fullmatch(n) and type(m) is nn.Linear]
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, child, Fp8Linear.from_linear(getattr(holder, child), compute_dtype))
    return names


STORAGES = ("bf16", "fp8", "nf4", "int8")
"""How the frozen base's QUANTIZED_MODULES weights are held; "bf16" = in the compute dtype, like the rest."""


def check_storage(storage: str) -> None:
    """Raise ModelLoadError for an unknown storage name."""
    if storage not in STORAGES:
        raise ModelLoadError(f"storage {storage!r}: expected one of {', '.join(STORAGES)}")


def bitsandbytes(storage: str) -> ModuleType:
    """The bitsandbytes module for nf4 / int8 storage, or a ModelLoadError saying how to install it."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken install raising at import
        why = (str(e).splitlines() or [""])[0]
        raise ModelLoadError(f'model.memory = "{storage}" needs bitsandbytes: pip install bitsandbytes '
                             f"({type(e).__name__}: {why})") from e
    return bnb


def bnb_linear(weight: torch.Tensor, bias: torch.Tensor | None, storage: str, compute_dtype: torch.dtype,
               device: torch.device | str) -> nn.Linear:
    """A frozen bitsandbytes Linear4bit (nf4) or Linear8bitLt (int8) holding `weight`, quantized on `device`.

    bitsandbytes quantizes when the weight moves from CPU to the device, so the weight goes through the CPU.
    """
    bnb = bitsandbytes(storage)
    out_features, in_features = weight.shape
    cpu_weight = weight.detach().to("cpu", compute_dtype)
    with torch.device("meta"):
        if storage == "nf4":
            module = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None,
                                       compute_dtype=compute_dtype, quant_type="nf4")
        else:
            module = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None,
                                         has_fp16_weights=False, threshold=0.0)
    if storage == "nf4":
        module.weight = bnb.nn.Params4bit(cpu_weight, requires_grad=False, quant_type="nf4",
                                             compress_statistics=False, module=module)
    else:
        module.weight = bnb.nn.Int8Params(cpu_weight, requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().to("cpu", compute_dtype), requires_grad=False)
    return module.to(device)


def mark_storage(model: nn.Module, storage: str) -> None:
    """Flag a model with bitsandbytes layers (`is_loaded_in_4bit` / `_8bit`) so peft uses its QLoRA layers."""
    if storage == "nf4":
        model.is_loaded_in_4bit = True
    elif storage == "int8":
        model.is_loaded_in_8bit = True


def quantize_transformer(model: nn.Module, storage: str, compute_dtype: torch.dtype) -> list[str]:
    """Hold the QUANTIZED_MODULES Linears of a built model in `storage` (in place); returns their names.

    "bf16" changes nothing; "fp8" = Fp8Linear (per-row scales); "nf4" / "int8" = bitsandbytes layers on the
    device the weight is on. Call before any LoRA is injected.
    """
    check_storage(storage)
    if storage == "bf16":
        return []
    if storage == "fp8":
        return quantize_transformer_fp8(model, compute_dtype)
    bitsandbytes(storage)
    names = [n for n, m in model.named_modules() if QUANTIZED_MODULES.fullmatch(n) and type(m) is nn.Linear]
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent)
        linear = getattr(holder, child)
        setattr(holder, child, bnb_linear(linear.weight, linear.bias, storage, compute_dtype,
                                          linear.weight.device))
    mark_storage(model, storage)
    return names
