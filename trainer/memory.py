"""The memory planner: the peak GPU memory of a training config, term by term, predicted from the config
and checkpoint headers alone (nothing loads), and the plan (`model.memory`) that fits the free VRAM.

Terms of the peak: (1) the frozen base's resident weights in its storage (with block swap: everything
outside the main blocks + K main blocks), (2) the LoRA factors in fp32 (and a frozen training adapter),
(3) their fp32 gradients, (4) the optimizer state (and an EMA copy), (5) activations (replayed op by op
on the diffusers forward, see `trainer.memory_activations`), (6) swap buffers: the P = model.swap_prefetch
blocks in flight and, while blocks stream, one evicted block the caching allocator has not reused yet
(`trainer.model.swap`: K + P blocks resident, 2 (N - K - P) loads a step), (7) the dequantization
workspace, (8) a constant for the CUDA context and the caching allocator. Byte counts of (1)-(4) and (7)
are in `trainer.memory_terms`; each candidate also gets a predicted s/step relative to the bf16 plan.

API: parse_vram, MemoryPlan, estimate -> MemoryEstimate, choose_plan (raises MemoryPlanError),
free_vram; `trainer.memory_report` prints the plans (`python -m trainer plan`).

Sizes: "12GB" means 12 GiB (2**30 bytes), because a card sold as 12 GB has 12 GiB and nvidia-smi counts
MiB; every number printed is GiB.

Calibration: the activation term is multiplied by a factor (default 1.0) and the overhead constant can be
replaced, from a JSON file named by the environment variable ZIT_MEMORY_CALIBRATION, e.g.
`{"activation_factor": 1.08, "overhead_gib": 0.7}` (the GPU suite measures torch.cuda.max_memory_allocated
of real steps, divides the activation part by the prediction and writes the file), or from
`estimate(..., calibration=Calibration(...))`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from .config import TrainConfig
from .errors import ZitError
from .lora.spec import ZitSpec
from .memory_activations import ActivationPeak, ActivationSetup, activation_peak
from .memory_terms import (
    DTYPE_BYTES,
    GiB,
    Term,
    adapter_term,
    dequant_workspace,
    gib,
    lora_matrices,
    lora_targets,
    model_shapes,
    optimizer_state_bytes,
    step_seconds,
    weight_bytes,
)

# The CUDA context and kernel images (~0.3-0.4 GiB with lazy module loading), cuBLAS workspaces and what the
# caching allocator loses to fragmentation and rounding (~0.2 GiB at these sizes).
OVERHEAD_BYTES = int(0.6 * GiB)
MIN_RESOLUTION, RESOLUTION_STEP = 512, 128
TOKEN_MULTIPLE = 32  # the model pads image and caption tokens to a multiple of 32
CALIBRATION_ENV = "ZIT_MEMORY_CALIBRATION"


class MemoryPlanError(ZitError):
    """No memory plan fits the budget; the one-line message says what would; `estimates` were tried."""

    def __init__(self, message: str, estimates: list[MemoryEstimate] | None = None) -> None:
        super().__init__(message)
        self.estimates = list(estimates or [])
        self.report = ""  # plan_report's budget line and table of the estimates


def parse_vram(text: str, source: str = "--vram") -> int:
    """Bytes of a size such as "12GB", "12 GiB", "11.5G", "12000MB" or "12000MiB" (GB = GiB; bare = GiB)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?)?", text.strip(), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ZitError(f"{source} {text}: not a size; use e.g. 12GB")
    power = "KMGT".index(m.group(2).upper()) + 1 if m.group(2) else 3
    return int(float(m.group(1)) * 1024**power)


@dataclass(frozen=True)
class MemoryPlan:
    """How the frozen base is held: storage, resident main blocks with swap (0 = no swap), resolution."""

    storage: str  # "bf16" (= model.dtype) | "fp8" | "nf4" | "int8"
    swap_blocks: int = 0
    prefetch: int = 1
    resolution: int = 1024

    @property
    def name(self) -> str:
        return f"{self.storage} + swap (K={self.swap_blocks})" if self.swap_blocks else self.storage

    @property
    def memory(self) -> str:
        """The model.memory value of this plan."""
        return f"{self.storage}_swap" if self.swap_blocks else self.storage

    @property
    def label(self) -> str:
        return f"{self.name} at {self.resolution} px"


@dataclass(frozen=True)
class MemoryEstimate:
    """The predicted peak of one plan, term by term, and its step time relative to the bf16 plan."""

    plan: MemoryPlan
    terms: tuple[Term, ...]
    step_seconds: float
    relative_time: float

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    def term(self, name: str) -> Term:
        """The term called `name`."""
        return next(t for t in self.terms if t.name == name)

    @property
    def working(self) -> int:
        """The bytes a step allocates and frees again (activations, dequantization workspace)."""
        return sum(t.bytes for t in self.terms if t.name in ("activations", "dequant workspace"))

    def fits(self, budget: int | None) -> bool:
        """True when the total is within the budget (always, without a budget)."""
        return budget is None or self.total <= budget


@dataclass(frozen=True)
class Calibration:
    """Factors measured on a GPU: activations x activation_factor; the overhead constant."""

    activation_factor: float = 1.0
    overhead_bytes: int = OVERHEAD_BYTES


def load_calibration(path: str | None = None) -> Calibration:
    """The calibration in `path` (default: $ZIT_MEMORY_CALIBRATION; none = the defaults)."""
    path = path or os.environ.get(CALIBRATION_ENV, "")
    if not path:
        return Calibration()
    try:
        data = json.loads(Path(path).read_text())
        factor = float(data.pop("activation_factor", 1.0))
        overhead = float(data.pop("overhead_gib", OVERHEAD_BYTES / GiB))
        data.pop("device", None)  # where it was measured: for people
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ZitError(f"{CALIBRATION_ENV}={path}: not a readable calibration JSON ({e})") from None
    if data or not factor > 0 or not overhead >= 0:
        raise ZitError(f"{CALIBRATION_ENV}={path}: expected "
                       '{"activation_factor": > 0, "overhead_gib": >= 0}')
    return Calibration(factor, int(overhead * GiB))


def _pad(n: int) -> int:
    return -(-n // TOKEN_MULTIPLE) * TOKEN_MULTIPLE


def _targets(cfg: TrainConfig) -> str:
    return cfg.lora.target_regex if cfg.lora.targets == "custom" else cfg.lora.targets


@lru_cache(maxsize=64)
def _activations(spec: ZitSpec, setup: ActivationSetup) -> ActivationPeak:
    return activation_peak(model_shapes(spec), setup)


@lru_cache(maxsize=16)
def _weights(spec: ZitSpec, storage: str, dtype: str) -> tuple[int, tuple[int, ...]]:
    other, blocks = weight_bytes(model_shapes(spec), storage, dtype)
    return other, tuple(blocks)


@lru_cache(maxsize=16)
def _lora_names(spec: ZitSpec, targets: str) -> tuple[str, ...]:
    return tuple(lora_targets(spec, targets))


def _setup(cfg: TrainConfig, spec: ZitSpec, plan: MemoryPlan, text_tokens: int) -> ActivationSetup:
    return ActivationSetup(
        batch=cfg.data.batch_size, img_tokens=_pad((plan.resolution // 16) ** 2),
        text_tokens=_pad(text_tokens),
        act_bytes=DTYPE_BYTES[cfg.model.dtype], rank=cfg.lora.rank,
        lora=frozenset(_lora_names(spec, _targets(cfg))),
        checkpointing=cfg.model.gradient_checkpointing)


def estimate(cfg: TrainConfig, spec: ZitSpec, plan: MemoryPlan, *, text_tokens: int = 512,
             calibration: Calibration | None = None) -> MemoryEstimate:
    """The predicted peak GPU memory of training `cfg` on a transformer of `spec` with `plan`."""
    cal = calibration or load_calibration()
    shapes, m, o = model_shapes(spec), cfg.model, cfg.optim
    setup = _setup(cfg, spec, plan, text_tokens)
    other, blocks = _weights(spec, plan.storage, m.dtype)
    n = spec.n_layers
    k = min(plan.swap_blocks, n)
    in_flight = min(plan.prefetch, n - k) if k else 0
    streamed = n - k - in_flight if k else 0  # loaded twice a step (forward, backward recompute)
    lag = 1 if streamed else 0  # an evicted block the caching allocator cannot reuse yet (trainer.model.swap)
    block = max(blocks, default=0)
    storage = f"{plan.storage} ({m.dtype})" if plan.storage == "bf16" else plan.storage
    if k:
        base = Term("base weights", other + k * block, f"{storage}: outside blocks + {k} of {n} blocks")
    else:
        base = Term("base weights", other + sum(blocks), f"{storage}, all {n} blocks")
    matrices = lora_matrices(shapes, list(setup.lora), cfg.lora.rank)
    params = sum(r * c for r, c in matrices)
    terms = [base, Term("LoRA params", 4 * params, f"fp32, {params / 1e6:.1f} M, {len(setup.lora)} modules")]
    if cfg.turbo.uses_adapter:
        terms.append(adapter_term(cfg.turbo.adapter, DTYPE_BYTES[m.dtype]))
    terms.append(Term("grads", 4 * params, "fp32"))
    state, how = optimizer_state_bytes(o.optimizer, matrices)
    terms.append(Term("optimizer state", state, f"{o.optimizer}: {how}"))
    if o.ema:
        terms.append(Term("EMA", 4 * params, "fp32 copy"))
    act = _activations(spec, setup)
    where = "forward end" if act.where == "forward end" else f"backward of {act.where}"
    how = (f"{setup.batch} x ({setup.img_tokens} + {setup.text_tokens}) tokens, peak at {where}: kept "
           f"{gib(act.kept)}" + (f" + one block {gib(act.block)}" if setup.checkpointing else "")
           + f" + workspace {gib(act.workspace)} GiB")
    if cal.activation_factor != 1.0:
        how += f", x{cal.activation_factor:g} calibration"
    terms.append(Term("activations", round(act.act * cal.activation_factor), how))
    swap_note = (f"{in_flight} block(s) in flight + {lag} awaiting reuse; {2 * streamed} block loads a step"
                 if k else "no swap")
    terms.append(Term("swap buffers", (in_flight + lag) * block, swap_note))
    terms.append(dequant_workspace(plan.storage, shapes, act, setup.act_bytes))
    terms.append(Term("CUDA + allocator", cal.overhead_bytes, "context, workspaces, fragmentation"))
    seconds = step_seconds(shapes, plan.storage, streamed, block, setup)
    reference = MemoryPlan("bf16", resolution=max(cfg.data.resolutions))
    ref = seconds if plan == reference else step_seconds(shapes, "bf16", 0, block,
                                                         _setup(cfg, spec, reference, text_tokens))
    return MemoryEstimate(plan, tuple(terms), seconds, seconds / ref)


# ---------------------------------------------------------------------------------------------- choosing


def _kinds(cfg: TrainConfig) -> list[str]:
    memory = cfg.model.memory
    if memory != "auto":
        return [memory]
    if cfg.model.memory_preference == "speed":
        return ["bf16", "fp8", "fp8_swap"]
    return ["bf16", "bf16_swap", "fp8_swap"]


def _resolutions(cfg: TrainConfig) -> list[int]:
    top = max(cfg.data.resolutions)
    lower = range(top - RESOLUTION_STEP, MIN_RESOLUTION - 1, -RESOLUTION_STEP)
    return [top, *lower] if cfg.model.memory == "auto" and cfg.model.lower_resolution else [top]


def _best(cfg: TrainConfig, spec: ZitSpec, kind: str, resolution: int, budget: int | None,
          **kw: object) -> MemoryEstimate:
    """The estimate of one kind of plan; a swap plan with swap_blocks = 0 gets the largest K that fits
    (without a budget: all blocks but one resident), or K = 1 when none fits."""
    storage, swap = kind.removesuffix("_swap"), kind.endswith("_swap")
    plan = MemoryPlan(storage, 0, cfg.model.swap_prefetch, resolution)
    if not swap:
        return estimate(cfg, spec, plan, **kw)
    if cfg.model.swap_blocks:
        if cfg.model.swap_blocks >= spec.n_layers:
            raise MemoryPlanError(f"model.swap_blocks = {cfg.model.swap_blocks}: must be between 1 and "
                                  f"{spec.n_layers - 1} for this model ({spec.n_layers} main blocks)")
        return estimate(cfg, spec, replace(plan, swap_blocks=cfg.model.swap_blocks), **kw)
    lo, hi = 1, max(1, spec.n_layers - 1)
    top = estimate(cfg, spec, replace(plan, swap_blocks=hi), **kw)
    if top.fits(budget):
        return top
    while lo < hi:  # the total grows with K: bisect for the largest K that fits
        mid = (lo + hi + 1) // 2
        if estimate(cfg, spec, replace(plan, swap_blocks=mid), **kw).fits(budget):
            lo = mid
        else:
            hi = mid - 1
    return estimate(cfg, spec, replace(plan, swap_blocks=lo), **kw)


def choose_plan(cfg: TrainConfig, spec: ZitSpec, budget_bytes: int | None, *, text_tokens: int = 512,
                calibration: Calibration | None = None) -> tuple[MemoryPlan, list[MemoryEstimate]]:
    """The first plan in cfg's order that fits the budget (None: the first), and the candidates estimated:
    every kind at the top resolution, then lower resolutions (model.lower_resolution) until one fits."""
    kw = {"text_tokens": text_tokens, "calibration": calibration or load_calibration()}
    resolutions = _resolutions(cfg)
    tried: list[MemoryEstimate] = []
    for resolution in resolutions:
        row = [_best(cfg, spec, kind, resolution, budget_bytes, **kw) for kind in _kinds(cfg)]
        tried += row
        chosen = next((e for e in row if e.fits(budget_bytes)), None)
        if chosen is not None:
            return chosen.plan, tried
    smallest = min(tried, key=lambda e: e.total)
    raise MemoryPlanError(f"{_gib1(budget_bytes or 0)} free is not enough for any plan: the smallest, "
                          f"{smallest.plan.label}, needs {_gib1(smallest.total)}; "
                          + _hint(cfg, spec, budget_bytes, kw), tried)


def _gib1(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def _hint(cfg: TrainConfig, spec: ZitSpec, budget: int | None, kw: dict) -> str:
    """What would fit, as the end of the one-line refusal: fp8 + swap, then lower resolutions."""
    auto = replace(cfg, model=replace(cfg.model, memory="auto", lower_resolution=True, swap_blocks=0))
    top, *lower = _resolutions(auto)
    if cfg.model.memory != "auto":
        est = _best(auto, spec, "fp8_swap", top, budget, **kw)
        if est.fits(budget):
            return f"{est.plan.name} would fit: set model.memory = \"auto\" or \"fp8_swap\""
    if cfg.model.memory != "auto" or not cfg.model.lower_resolution:
        for resolution in lower:
            est = _best(auto, spec, "fp8_swap", resolution, budget, **kw)
            if est.fits(budget):
                how = "allow model.lower_resolution" if cfg.model.memory == "auto" else (
                    "set model.memory = \"auto\" with model.lower_resolution = true")
                return f"{est.plan.label} would fit: free memory, or {how}"
    return "free memory, or lower data.batch_size, lora.rank or data.resolutions"


def free_vram(device: object) -> int | None:
    """Free bytes on a CUDA device (torch.cuda.mem_get_info), None on any other device."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def transformer_spec(cfg: TrainConfig) -> ZitSpec:
    """The spec of cfg's transformer: the tiny one, or read from the checkpoint's headers."""
    if cfg.model.transformer == "tiny":
        from .tiny import TINY_SPEC

        return TINY_SPEC
    from .model import checkpoint_spec

    return checkpoint_spec(cfg.model.transformer)
