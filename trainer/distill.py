"""Distill mode: teach an 8-step cfg-1 student (base + SFT LoRA + a distill LoRA) the teacher's trajectories.

The teacher is the same transformer with the trainable distill LoRA switched off (base + SFT LoRA), sampled
de-turbo: `TeacherSettings.steps` Euler steps at cfg `TeacherSettings.cfg` against the empty prompt, on a
shifted sigma grid that contains ZIT's 8 turbo sigmas. Its latents at those sigmas and at s = 0 are cached
once per (prompt, seed, size) by trainer/distill_cache.py; here are the settings, the loss and the outputs.

Objective, for a drawn student index i (0..7): the student's velocity at (x_i, s_i) regresses onto the
teacher's finite-difference velocity (x_{i+1} - x_i) / (s_{i+1} - s_i), the step the 8-step sampler would
need to land on the teacher's next latent. The optional rollout term runs the student r steps from x_i (with
gradients through every step) and compares the clean latent implied by where it lands with the teacher's:
x0 = x_i - s_i v_eff, v_eff = (x_end - x_i) / (s_end - s_i); for r = 1 this is s_i^2 times the velocity MSE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ZitError
from .lora.blocks import BlockWeights
from .lora.canonical import Lora, LoraModule
from .lora.merge import merge_exact
from .model import lora_from_peft, predict_velocity
from .objective import TURBO_SHIFT, TURBO_STEPS, inference_sigmas, mse_per_sample, x0_from_velocity

DISTILL_ADAPTER = "zit"
"""Default peft name of the trainable distill LoRA (the loop's trained adapter)."""
SFT_ADAPTER = "adapter"
"""Default peft name of the frozen SFT LoRA (the loop's frozen adapter slot)."""

STUDENT_GRID: tuple[float, ...] = tuple(inference_sigmas(TURBO_STEPS, TURBO_SHIFT).tolist())
"""The 9 sigmas of ZIT's turbo sampler: the 8 student sigmas 1.0 ... 0.3 and the end point 0."""
STUDENT_SIGMAS: tuple[float, ...] = STUDENT_GRID[:-1]
N_STUDENT = len(STUDENT_SIGMAS)
SIGMA_TOLERANCE = 1e-6
MAX_ROLLOUT = N_STUDENT


class DistillError(ZitError):
    """A distill setting or a trajectory we refuse; the message names the field or file."""


@dataclass(frozen=True)
class TeacherSettings:
    """How teacher trajectories are sampled: Euler steps, CFG scale against the empty prompt, sigma shift."""

    steps: int = 32
    cfg: float = 2.0
    shift: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise DistillError(f"teacher steps = {self.steps!r}: expected a whole number in 1..1000")
        if not math.isfinite(self.cfg) or self.cfg <= 0:
            raise DistillError(f"teacher cfg = {self.cfg!r}: expected a finite number > 0")
        if not math.isfinite(self.shift) or self.shift <= 0:
            raise DistillError(f"teacher shift = {self.shift!r}: expected a finite number > 0")
        missing = self._missing()
        if missing:
            hint = (" (with shift 3 use a multiple of 8 steps, e.g. 32 or 48)" if self.shift == TURBO_SHIFT
                    else f" (use shift {TURBO_SHIFT:g} and a multiple of 8 steps)")
            raise DistillError(f"teacher steps = {self.steps}, shift = {self.shift:g}: the sigma grid lacks "
                               f"the student sigmas {', '.join(f'{s:.4f}' for s in missing)}{hint}")

    def sigmas(self) -> torch.Tensor:
        """The steps + 1 teacher sigmas, float32, from 1 down to 0."""
        return inference_sigmas(self.steps, self.shift)

    def _missing(self) -> list[float]:
        grid = self.sigmas().tolist()
        return [s for s in STUDENT_GRID if not any(abs(g - s) <= SIGMA_TOLERANCE for g in grid)]

    @property
    def student_sigmas(self) -> tuple[float, ...]:
        """The 8 turbo sigmas the student samples at (every one is on the teacher grid)."""
        return STUDENT_SIGMAS

    def student_indices(self) -> tuple[int, ...]:
        """Index into `sigmas()` of each of the 9 student grid points (8 sigmas and the end point 0)."""
        grid = self.sigmas().tolist()
        return tuple(min(range(len(grid)), key=lambda k, s=s: abs(grid[k] - s)) for s in STUDENT_GRID)

    @property
    def passes(self) -> int:
        """Transformer passes per teacher trajectory: steps, twice with CFG."""
        return self.steps * (1 if self.cfg == 1.0 else 2)

    def describe(self) -> str:
        """The settings as one stable string (part of the trajectory cache key)."""
        return f"steps={self.steps};cfg={self.cfg!r};shift={self.shift!r}"


# ---- the objective ----------------------------------------------------------------------------------


@dataclass
class DistillTerms:
    """One distill loss: the weighted total, its parts (fp32 scalars) and the student indices drawn."""

    total: torch.Tensor
    velocity: torch.Tensor
    rollout: torch.Tensor | None
    indices: torch.Tensor


def _check_batch(trajectories: torch.Tensor, embeds: Sequence[torch.Tensor]) -> None:
    if trajectories.ndim != 5 or trajectories.shape[1] != len(STUDENT_GRID):
        raise DistillError(f"trajectories have shape {tuple(trajectories.shape)}; expected "
                           f"(batch, {len(STUDENT_GRID)}, channels, height, width)")
    if len(embeds) != trajectories.shape[0]:
        raise DistillError(f"{len(embeds)} text embeddings for {trajectories.shape[0]} trajectories")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def teacher_velocity(trajectories: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The teacher's finite-difference velocity (x_{i+1} - x_i) / (s_{i+1} - s_i) per sample, fp32."""
    grid = torch.tensor(STUDENT_GRID, dtype=torch.float32)
    rows = torch.arange(trajectories.shape[0])
    idx = indices.cpu()
    x_i, x_next = trajectories[rows, idx].float(), trajectories[rows, idx + 1].float()
    return (x_next - x_i) / _per_sample(grid[idx + 1] - grid[idx], x_i)


def _rollout_x0_loss(model: nn.Module, trajectories: torch.Tensor, embeds: Sequence[torch.Tensor],
                     indices: torch.Tensor, first_velocity: torch.Tensor, rollout: int) -> torch.Tensor:
    """Roll the student `rollout` steps from x_i (first step: `first_velocity`) and compare implied x0."""
    grid = torch.tensor(STUDENT_GRID, dtype=torch.float32)
    rows = torch.arange(trajectories.shape[0])
    end = (indices + rollout).clamp(max=N_STUDENT)
    x_start = trajectories[rows, indices].float()
    x = x_start + _per_sample(grid[indices + 1] - grid[indices], x_start) * first_velocity
    for k in range(1, rollout):
        active = torch.nonzero(indices + k < end).flatten()
        if active.numel() == 0:
            break
        here = indices[active] + k
        sig = grid[here].to(x.device)
        v = predict_velocity(model, x[active.to(x.device)], sig, [embeds[int(j)] for j in active])
        step = x[active.to(x.device)] + _per_sample(grid[here + 1] - grid[here], v) * v
        x = x.index_put((active.to(x.device),), step)
    s_start, s_end = grid[indices], grid[end]
    x_teacher = trajectories[rows, end].float()
    span = _per_sample(s_end - s_start, x)
    x0_student = x0_from_velocity(x_start, (x - x_start) / span, s_start)
    x0_teacher = x0_from_velocity(x_start, (x_teacher - x_start) / span, s_start)
    return mse_per_sample(x0_student, x0_teacher).mean()


def distill_terms(
    model: nn.Module,
    trajectories: torch.Tensor,
    embeds: Sequence[torch.Tensor],
    generator: torch.Generator,
    rollout: int = 0,
    rollout_weight: float = 0.0,
    velocity_weight: float = 1.0,
) -> DistillTerms:
    """The distill loss on cached trajectories (B, 9, C, h, w) with its parts; indices drawn by `generator`.

    Velocity term: MSE (fp32) between the student's velocity at (x_i, s_i) and the teacher's finite
    difference. Rollout term (rollout >= 2 and rollout_weight > 0): x0-space MSE after a student rollout
    of up to `rollout` steps from x_i (shorter where it reaches s = 0), gradients through every step.
    """
    _check_batch(trajectories, embeds)
    if not 0 <= rollout <= MAX_ROLLOUT or rollout == 1:
        raise DistillError(f"distill rollout = {rollout}: expected 0 (off) or 2..{MAX_ROLLOUT} steps")
    if rollout_weight < 0 or velocity_weight < 0:
        raise DistillError(f"distill weights must be >= 0, got velocity {velocity_weight}, "
                           f"rollout {rollout_weight}")
    batch = trajectories.shape[0]
    indices = torch.randint(N_STUDENT, (batch,), generator=generator)
    grid = torch.tensor(STUDENT_GRID, dtype=torch.float32)
    x_i = trajectories[torch.arange(batch), indices].float()
    v = predict_velocity(model, x_i, grid[indices].to(x_i.device), embeds)
    velocity = mse_per_sample(v, teacher_velocity(trajectories, indices)).mean()
    total = velocity_weight * velocity
    roll = None
    if rollout and rollout_weight:
        roll = _rollout_x0_loss(model, trajectories, embeds, indices, v, rollout)
        total = total + rollout_weight * roll
    return DistillTerms(total, velocity, roll, indices)


# ---- outputs ----------------------------------------------------------------------------------------


def _float32(lora: Lora) -> Lora:
    modules = {k: LoraModule(m.a.float(), m.b.float()) for k, m in lora.modules.items()}
    return Lora(modules, dict(lora.metadata), lora.spec)


def merge_sft_and_distill(
    sft: Lora, distill: Lora, sft_strength: float = 1.0, metadata: Mapping[str, str] | None = None
) -> Lora:
    """One plain LoRA with dW = sft_strength * dW_sft + dW_distill exactly (factors concatenated, fp32).

    Where both have a module its rank is r_sft + r_distill; the distill factors are the last rows of A.
    """
    merged = merge_exact([(_float32(sft), BlockWeights(ratio=sft_strength)),
                          (_float32(distill), BlockWeights())], dtype=torch.float32)
    merged.metadata.update(metadata or {})
    merged.metadata["zit.distill"] = "merged"
    return merged


def distill_outputs(
    model: nn.Module,
    sft: Lora,
    sft_strength: float = 1.0,
    adapter: str = DISTILL_ADAPTER,
    metadata: Mapping[str, str] | None = None,
) -> tuple[Lora, Lora]:
    """(the distill LoRA alone, SFT + distill merged exactly), canonical fp32, ready for write_lora."""
    distill = lora_from_peft(model, adapter)
    distill.metadata.update(metadata or {})
    distill.metadata["zit.distill"] = "distill"
    return distill, merge_sft_and_distill(sft, distill, sft_strength, metadata)
