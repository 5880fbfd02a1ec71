"""The memory planner's terms besides activations, read from the transformer built on meta (exact for any
ZitSpec): frozen weights by storage, LoRA factors, optimizer state, the training adapter, the
dequantization workspace, and the FLOPs and predicted seconds of one step.

Storage per element of the big block Linears (`trainer.model.quantize.QUANTIZED_MODULES`):
- bf16/fp16/fp32 ("bf16" plan): model.dtype, like every other weight;
- fp8: 1 byte + a float32 scale per output row (4 x out_features);
- nf4 (bitsandbytes Linear4bit, blocksize 64, no double quant): 0.5 byte + a float32 absmax per 64 elements;
- int8 (bitsandbytes Linear8bitLt): 1 byte + a float32 scale per output row.
Everything else (embedders, norms, adaLN modulation, final layer, pad tokens) stays in model.dtype.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from .errors import ZitError
from .lora.spec import ZitSpec

if TYPE_CHECKING:
    from .memory_activations import ActivationPeak, ActivationSetup

GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
NF4_BLOCK = 64
_MAIN_BLOCK = re.compile(r"layers\.(\d+)\.")


def gib(n: float) -> str:
    """Bytes as GiB with 2 decimals."""
    return f"{n / GiB:.2f}"


@dataclass(frozen=True)
class Term:
    """One row of the estimate."""

    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class ModelShapes:
    """Parameter shapes and Linear sizes of one transformer spec."""

    spec: ZitSpec
    params: tuple[tuple[str, tuple[int, ...]], ...]  # every parameter and buffer
    linears: dict[str, tuple[int, int]]  # Linear module name -> (out_features, in_features)
    quantized: frozenset[str]  # Linear modules stored quantized in the fp8 / nf4 / int8 plans

    @property
    def n_layers(self) -> int:
        return self.spec.n_layers


@lru_cache(maxsize=4)
def meta_model(spec: ZitSpec):  # noqa: ANN201 - a ZImageTransformer2DModel on meta
    """The transformer of `spec` on the meta device (no memory), cached."""
    from .model import build_transformer

    return build_transformer(spec)


@lru_cache(maxsize=4)
def model_shapes(spec: ZitSpec) -> ModelShapes:
    """Shapes of every weight and Linear of `spec`, read from the meta model."""
    from torch import nn

    from .model.quantize import QUANTIZED_MODULES

    model = meta_model(spec)
    params = tuple((n, tuple(t.shape)) for n, t in [*model.named_parameters(), *model.named_buffers()])
    linears = {n: (m.out_features, m.in_features)
               for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantized = frozenset(n for n in linears if QUANTIZED_MODULES.fullmatch(n))
    return ModelShapes(spec, params, linears, quantized)


def quantized_weight_bytes(storage: str, out_f: int, in_f: int) -> int:
    """Bytes of one quantized Linear weight (out_f x in_f) in `storage`, scales included."""
    n = out_f * in_f
    if storage == "fp8" or storage == "int8":
        return n + 4 * out_f
    if storage == "nf4":
        return (n + 1) // 2 + 4 * math.ceil(n / NF4_BLOCK)
    raise ValueError(f"not a quantized storage: {storage!r}")


def weight_bytes(shapes: ModelShapes, storage: str, dtype: str) -> tuple[int, list[int]]:
    """(bytes outside the main blocks, bytes of each main block) of the frozen base in `storage`."""
    elem = DTYPE_BYTES[dtype]
    blocks = [0] * shapes.n_layers
    other = 0
    for name, shape in shapes.params:
        module, _, leaf = name.rpartition(".")
        if storage != "bf16" and leaf == "weight" and module in shapes.quantized:
            size = quantized_weight_bytes(storage, *shapes.linears[module])
        else:
            size = math.prod(shape) * elem
        m = _MAIN_BLOCK.match(name)
        if m:
            blocks[int(m.group(1))] += size
        else:
            other += size
    return other, blocks


def lora_targets(spec: ZitSpec, targets: str) -> list[str]:
    """The Linear names a LoRA on `targets` (preset or regex) covers, exactly as the trainer resolves them."""
    from .model import resolve_targets

    return resolve_targets(meta_model(spec), targets)


def lora_matrices(shapes: ModelShapes, names: list[str], rank: int) -> list[tuple[int, int]]:
    """The (rows, cols) of every LoRA factor: A is rank x in, B is out x rank."""
    out: list[tuple[int, int]] = []
    for name in names:
        out_f, in_f = shapes.linears[name]
        out += [(rank, in_f), (out_f, rank)]
    return out


# bitsandbytes 8-bit optimizers: tensors under 4096 elements keep fp32 state; larger ones are quantized
# blockwise (256 elements per block, one float32 absmax per block and state).
_BNB_MIN_8BIT = 4096
_BNB_BLOCK = 256


def optimizer_state_bytes(optimizer: str, matrices: list[tuple[int, int]]) -> tuple[int, str]:
    """Bytes of the optimizer state of fp32 parameters of these shapes, and how they were counted."""
    numels = [r * c for r, c in matrices]
    n = sum(numels)
    steps = 4 * len(matrices)  # torch's AdamW keeps one float32 `step` tensor per parameter
    if optimizer == "adamw":
        return 8 * n + steps, "exp_avg + exp_avg_sq, fp32"
    if optimizer == "adamw8bit":
        size = sum(
            2 * k + 8 * math.ceil(k / _BNB_BLOCK) if k >= _BNB_MIN_8BIT else 8 * k for k in numels
        )
        return size, "2 x uint8 + blockwise absmax (bitsandbytes)"
    if optimizer == "lion":
        return 4 * n, "exp_avg, fp32"
    if optimizer == "prodigy":
        return 16 * n, "exp_avg, exp_avg_sq, s, p0, fp32"
    if optimizer == "adafactor":  # transformers' Adafactor, no momentum: row + column averages and an RMS
        return 4 * sum(r + c + 1 for r, c in matrices), "factored second moment (rows + cols), fp32"
    raise ValueError(f"unknown optimizer {optimizer!r}")


def adapter_bytes(path: str, elem: int) -> int:
    """Bytes of the factors of a LoRA file held as a frozen peft adapter (in the model's dtype, `elem` bytes
    per element), from its header: every 2-D tensor."""
    from .model import read_header

    return elem * sum(math.prod(i.shape) for i in read_header(path).values() if len(i.shape) == 2)


def adapter_term(path: str, elem: int) -> Term:
    """The frozen training adapter's bytes from its file header, or a 0-byte term saying why not."""
    try:
        return Term("training adapter", adapter_bytes(path, elem), "frozen, in model.dtype (file header)")
    except (ZitError, OSError):
        return Term("training adapter", 0, f"not counted: cannot read {path or 'turbo.adapter'}")


def dequant_workspace(storage: str, shapes: ModelShapes, act: ActivationPeak, act_bytes: int) -> Term:
    """Memory of dequantizing the quantized block Linears, on top of the activations' peak.

    fp8 (Fp8Linear): autograd keeps the fp8 weight only; each pass dequantizes one Linear at a time: the
    largest Linear's two float32 temporaries and its compute-dtype result (8 + 2 bytes an element), where they
    exceed the backward workspace they alternate with. bitsandbytes keeps the quantized weight for
    backward and dequantizes the largest Linear there again: counted twice, in the compute dtype."""
    largest = max((o * i for n, (o, i) in shapes.linears.items() if n in shapes.quantized), default=0)
    if storage == "fp8":
        extra = max(0, (8 + act_bytes) * largest - act.workspace)
        note = "the largest Linear dequantized (fp32 temporaries + result), beyond the backward workspace"
        return Term("dequant workspace", extra, note)
    if storage in ("nf4", "int8"):
        return Term("dequant workspace", 2 * largest * act_bytes, "the largest Linear dequantized, x2")
    return Term("dequant workspace", 0, "none")


# ---------------------------------------------------------------------------------------------- FLOPs


def forward_flops(shapes: ModelShapes, batch: int, img_tokens: int, text_tokens: int,
                  lora: list[str], rank: int) -> tuple[float, float]:
    """(FLOPs of one forward outside the main blocks, mean FLOPs of one main block): 2 x weights x
    tokens for every Linear (+ its LoRA), 4 x tokens^2 x dim for attention."""
    spec = shapes.spec
    lora_set = set(lora)
    seq = img_tokens + text_tokens
    rows_of = {"noise_refiner": img_tokens, "context_refiner": text_tokens, "layers": seq}

    def linear_flops(name: str, out_f: int, in_f: int) -> float:
        kind = name.split(".")[0]
        rows = batch * rows_of.get(kind, img_tokens)
        lora_f = rank * (in_f + out_f) if name in lora_set else 0
        return 2.0 * rows * (out_f * in_f + lora_f)

    main = 0.0
    other = 0.0
    for name, (out_f, in_f) in shapes.linears.items():
        f = linear_flops(name, out_f, in_f)
        if name.startswith("layers."):
            main += f / spec.n_layers
        else:
            other += f
    attention = 4.0 * batch * spec.dim
    main += attention * seq * seq
    other += spec.n_refiner_layers * attention * (img_tokens**2 + text_tokens**2)
    return other, main


# ---------------------------------------------------------------------------------------------- step time

# Assumptions of the relative step time (a 12-16 GB card of the RTX 30/40 class, PCIe 4.0 x16):
THROUGHPUT = 40e12  # effective bf16 FLOP/s of the matmuls
MEMORY_BANDWIDTH = 400e9  # bytes/s of GPU memory, for dequantization traffic
PCIE_BANDWIDTH = 20e9  # bytes/s host -> GPU from pinned memory, for block swap
# Bytes moved per weight element per dequantization: fp8 as Fp8Linear does it (read 1, write and read
# two float32 temporaries, write 2); bitsandbytes nf4 / int8 kernels (read 0.5 / 1, write and read 2).
DEQUANT_TRAFFIC = {"fp8": 19.0, "nf4": 4.5, "int8": 5.0}


def step_seconds(shapes: ModelShapes, storage: str, streamed: int, block_bytes: int,
                 setup: ActivationSetup) -> float:
    """Predicted seconds per micro-batch: matmuls at THROUGHPUT, dequantization traffic at
    MEMORY_BANDWIDTH, and the swap traffic (`streamed` main blocks of `block_bytes` loaded in forward and
    again for the backward recompute) not hidden behind the compute it overlaps: max(compute, transfer)
    per block."""
    other_f, block_f = forward_flops(shapes, setup.batch, setup.img_tokens, setup.text_tokens,
                                     sorted(setup.lora), setup.rank)
    passes = 4 if setup.checkpointing else 3  # forward, backward ~2x forward, (recompute)
    deq_passes = 0
    if storage == "fp8":
        deq_passes = 2 if setup.checkpointing else 1  # forward (+ recompute); backward reuses the weight
    elif storage in ("nf4", "int8"):
        deq_passes = 3 if setup.checkpointing else 2  # bitsandbytes dequantizes again in backward
    traffic = DEQUANT_TRAFFIC.get(storage, 0.0) / MEMORY_BANDWIDTH

    def dequant(prefixes: tuple[str, ...]) -> float:
        return traffic * sum(o * i for n, (o, i) in shapes.linears.items()
                             if n in shapes.quantized and n.startswith(prefixes))

    per_block = dequant(("layers.",)) / max(1, shapes.n_layers)
    fwd = block_f / THROUGHPUT + per_block
    bwd = (passes - 1) * block_f / THROUGHPUT + (deq_passes - 1) * per_block
    other = passes * other_f / THROUGHPUT + deq_passes * dequant(("noise_refiner.", "context_refiner."))
    load = block_bytes / PCIE_BANDWIDTH
    resident = shapes.n_layers - streamed
    return other + resident * (fwd + bwd) + streamed * (max(fwd, load) + max(bwd, load))
