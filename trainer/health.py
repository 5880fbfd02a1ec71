"""Turbo health: how much of Z-Image-Turbo's few-step ability survives the LoRA being trained.

Formula. Run the turbo sampler (8 Euler steps, shift 3, cfg 1, the preview's turbo row) from fixed seeds
with the training adapter removed, as at inference, and record at every step i the model's prediction of
the clean latent, ``x0_i = x_i - s_i * v_i``. The x0 disagreement of one sample is

    D = mean over i = 1 .. 6 of ||x0_i - x0_7||^2 / ||x0_7||^2

(x0_7, the last prediction, is the sample itself; i = 0 at pure noise is left out: it is the coarsest
guess of any model, and including it moved the fixture's numbers by under 7 %). Turbo health is the mean D
over the seeds now, divided by the same for the base with every adapter off:

    health = mean D(base + LoRA, adapters off) / mean D(base)

so 1.0 = as turbo as the untouched model, higher = worse, comparable across models, prompts and sizes. The
reference involves no trained weight, so it is the same at step 0, later, or after a resume.

Why this. An 8-step Euler sampler is exact only where the flow is straight, i.e. where the x0 the model
predicts stays put along the trajectory. A distilled few-step model commits early: its first predictions
already are the image it ends on. Flow-matching training on images (a plain LoRA, "sft") pulls the
velocity back towards the data's posterior mean, E[noise - x0 | x_s]: its x0 is a blur at high noise that
sharpens later, so along the 8 steps the predictions drift, and 8 Euler steps cannot follow that curve -
the blurry turbo output sft is known for. D measures the drift directly, costs one cfg-1 trajectory
(8 forwards per seed, no negative prompt), and needs no reference image.

Not the distance of the 8-step sample to a 30-step cfg-2 ("de-turbo") sample of the same seed: that costs
68 forwards instead of 8, and on the turbo fixture (trainer.turbo_fixture) it was erratic - across fixture
variants sft moved it by 0.85x to 8.6x and adapter-mode training by 0.8x to 4.5x - because the
reference moves with the model and with guidance.

Threshold. TURBO_WARNING = 2.0, the x0 drift doubled. Measured on the turbo fixture (rank-8 LoRA, lr 2e-3,
batch 4, 8 latents of the fixture's world, health after 10/20/30/40 steps; tests/test_health.py): a
plain LoRA (sft) reads 1.26, 1.48, 1.82, 2.50; the same LoRA trained over the fixture's de-distilling
adapter reads 1.24, 1.37, 1.50, 1.41; lr 0 reads 1.00 throughout. Over 2 fixture seeds x 4 data seeds,
sft crossed 2.0 after 20-40 steps (2.5-3.8 at step 40) while adapter mode stayed at 1.26-1.68 for 40 steps
and reached about 2 only at step 60 (sft: 3.7-4.7 by then). So 2.0 is crossed early by sft and 1.5-3x
later by adapter-mode training, which also slowly wears turbo down. It is provisional for the real 6B
model: calibrate it on a real sft run against an adapter run before relying on the exact value.

Distill mode (TeacherDistance). There the student is meant to follow its teacher (base + SFT LoRA sampled
de-turbo), whose own x0 predictions drift: distilling towards it raised the drift meter (2.53 -> 3.54 on
the fixture) while the 8-step sample moved 3.6x closer to the teacher. So distill runs are measured by
what they optimise, on cached teacher trajectories (no extra teacher passes):

    health = mean ||x_8(student) - x_teacher|| / ||x_teacher||, divided by the same with the distill LoRA off

where x_8 is the 8-step cfg-1 sample from the trajectory's own starting noise. 1.0 = as far from the teacher
as the SFT LoRA alone, lower = better. DISTILL_WARNING = 1.0: above it the distill LoRA makes the 8-step
output worse than not having it. On the fixture (sft 40 steps, then distill at lr 2e-3, health every 20
steps) it read 1.0, 0.47, 0.51, 0.46, 0.46, 0.44, 0.42; at lr 2e-2 it wandered 0.58-1.45; at lr 1e-1 (a
broken run) 2.39, 1.97, 1.56, 1.22, 1.37, 1.13.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .errors import ZitError
from .model import adapters_disabled, predict_velocity
from .objective import TURBO_SHIFT, TURBO_STEPS, inference_sigmas
from .sampling import VAE_FACTOR, initial_noise

TURBO_WARNING = 2.0
"""Health above which training is said to be breaking turbo (see the module docstring for the numbers)."""
DISTILL_WARNING = 1.0
"""Distill mode: above 1 the distill LoRA makes the 8-step output worse than the SFT LoRA alone."""
WARNING_MESSAGE = "turbo is degrading: stop here, or use the DistillPatch / distill mode"


class HealthError(ZitError):
    """A turbo-health request we refuse (bad sizes, mismatched prompts and seeds, a degenerate reference)."""


def _check(embeds: Sequence[torch.Tensor], seeds: Sequence[int], width: int, height: int) -> None:
    if not seeds:
        raise HealthError("turbo health: no seeds given")
    if len(embeds) != len(seeds):
        raise HealthError(f"turbo health: {len(embeds)} prompt embeddings for {len(seeds)} seeds")
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % (2 * VAE_FACTOR):
            raise HealthError(f"turbo health: {name} {value} is not a positive multiple of {2 * VAE_FACTOR}")


@torch.no_grad()
def turbo_x0_predictions(model: nn.Module, embeds: Sequence[torch.Tensor], seeds: Sequence[int], width: int,
                         height: int, steps: int = TURBO_STEPS,
                         shift: float = TURBO_SHIFT) -> list[torch.Tensor]:
    """Run the cfg-1 Euler sampler (as `sampling.sample_latents`) and return its x0 predictions
    ``x_i - s_i v_i``, one (B, C, h, w) float32 tensor per step; the last one is the sample itself."""
    _check(embeds, seeds, width, height)
    noise = torch.stack([initial_noise(s, width, height) for s in seeds])
    return x0_predictions_from(model, noise, embeds, steps, shift)


@torch.no_grad()
def x0_predictions_from(model: nn.Module, noise: torch.Tensor, embeds: Sequence[torch.Tensor],
                        steps: int = TURBO_STEPS, shift: float = TURBO_SHIFT) -> list[torch.Tensor]:
    """The cfg-1 Euler sampler's x0 predictions from given noise (B, C, h, w); the last is the sample."""
    device = next(model.parameters()).device
    x = noise.to(device)
    embeds = [e.to(device) for e in embeds]
    sigmas = inference_sigmas(steps, shift).tolist()
    x0s = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        v = predict_velocity(model, x, torch.full((x.shape[0],), s, device=device), embeds).float()
        x0s.append(x.float() - s * v)
        x = x + (s_next - s) * v
    return x0s


def disagreement(x0s: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per sample (B,): mean over steps 1..n-2 of ||x0_i - x0_last||^2 / ||x0_last||^2."""
    if len(x0s) < 3:
        raise HealthError(f"turbo health: {len(x0s)} sampler steps; need at least 3")
    last = x0s[-1].flatten(1)
    norm = last.pow(2).sum(1).clamp_min(1e-12)
    terms = [(x0.flatten(1) - last).pow(2).sum(1) / norm for x0 in x0s[1:-1]]
    return torch.stack(terms).mean(0)


def x0_disagreement(model: nn.Module, embeds: Sequence[torch.Tensor], seeds: Sequence[int], width: int,
                    height: int, steps: int = TURBO_STEPS, shift: float = TURBO_SHIFT) -> torch.Tensor:
    """The per-sample x0 disagreement (B,) of the model as it stands along its turbo trajectory."""
    return disagreement(turbo_x0_predictions(model, embeds, seeds, width, height, steps, shift))


class TurboHealth:
    """x0 disagreement of base + trained LoRA (training adapters off) relative to the untouched base."""

    scale = "1 = as turbo as the base, higher = worse"

    def __init__(self, model: nn.Module, embeds: Sequence[torch.Tensor], seeds: Sequence[int], width: int,
                 height: int, *, disable: Iterable[str] = (), steps: int = TURBO_STEPS,
                 shift: float = TURBO_SHIFT, threshold: float = TURBO_WARNING):
        """`disable`: adapters switched off while measuring (the frozen training adapter, as at inference)."""
        _check(embeds, seeds, width, height)
        if threshold <= 1.0:
            raise HealthError(f"turbo health: warning threshold {threshold} must be above 1")
        if steps < 3:
            raise HealthError(f"turbo health: {steps} sampler steps; need at least 3")
        self.model, self.embeds, self.seeds = model, list(embeds), list(seeds)
        self.width, self.height, self.steps, self.shift = width, height, steps, shift
        self.disable, self.threshold = list(disable), threshold
        with adapters_disabled(model, self.disable):  # refuses unknown adapter names now, not mid-run
            pass
        self.base: float | None = None

    def _value(self, names: list[str] | None) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            with adapters_disabled(self.model, names):
                return x0_disagreement(self.model, self.embeds, self.seeds, self.width, self.height,
                                       self.steps, self.shift).mean().item()
        finally:
            self.model.train(was_training)

    def reference(self) -> float:
        """The base model's disagreement (every adapter off); computed once and kept."""
        if self.base is None:
            value = self._value(None)
            if not value > 0 or value == float("inf"):
                raise HealthError(f"turbo health: the base model's x0 disagreement is {value}; "
                                  "it cannot serve as the reference")
            self.base = value
        return self.base

    def raw(self) -> float:
        """The current x0 disagreement (trained LoRA on, `disable` adapters off)."""
        return self._value(self.disable)

    def measure(self) -> float:
        """Turbo health now: raw() / reference(); 1.0 = as turbo as the base, higher = worse."""
        base = self.reference()
        return self.raw() / base

    def warning(self, health: float) -> str | None:
        """A one-line warning ending in WARNING_MESSAGE when `health` is past the threshold (or not a
        number), else None."""
        if not health <= self.threshold:
            return (f"turbo health {health:.2f} (x0 drift {health:.1f}x the base's, limit "
                    f"{self.threshold:g}): {WARNING_MESSAGE}")
        return None


class TeacherDistance:
    """Distill mode's turbo health: the 8-step sample's distance to the teacher's, relative to the start."""

    scale = "1 = the SFT LoRA alone, lower = closer to the teacher"

    def __init__(self, model: nn.Module, trajectories: torch.Tensor, embeds: Sequence[torch.Tensor], *,
                 reference_disable: Iterable[str], threshold: float = DISTILL_WARNING):
        """`trajectories` (B, 9, C, h, w): cached teacher latents (index 0 = the noise, -1 = the teacher's
        image); `reference_disable`: the adapters that make the student (the distill LoRA), off for the
        reference."""
        if trajectories.ndim != 5 or len(trajectories) != len(embeds) or not len(embeds):
            raise HealthError(f"turbo health: {len(embeds)} prompt embeddings for trajectories of shape "
                              f"{tuple(trajectories.shape)}")
        self.model, self.embeds = model, list(embeds)
        self.noise, self.teacher = trajectories[:, 0].float(), trajectories[:, -1].float()
        self.reference_disable, self.threshold = list(reference_disable), threshold
        with adapters_disabled(model, self.reference_disable):  # unknown adapter names: refused now
            pass
        self.base: float | None = None

    def _distance(self, names: list[str]) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            with adapters_disabled(self.model, names):
                sample = x0_predictions_from(self.model, self.noise, self.embeds)[-1].cpu()
        finally:
            self.model.train(was_training)
        gap = (sample - self.teacher).flatten(1).norm(dim=1) / self.teacher.flatten(1).norm(dim=1)
        return gap.mean().item()

    def reference(self) -> float:
        """The 8-step sample's distance to the teacher with the student's LoRA off; computed once."""
        if self.base is None:
            value = self._distance(self.reference_disable)
            if not value > 0 or value == float("inf"):
                raise HealthError(f"turbo health: the 8-step sample's distance to the teacher is {value} "
                                  "without the distill LoRA; it cannot serve as the reference")
            self.base = value
        return self.base

    def measure(self) -> float:
        """Distance now / reference(): 1.0 = as far from the teacher as the SFT LoRA alone, lower = better."""
        return self._distance([]) / self.reference()

    def warning(self, health: float) -> str | None:
        """A one-line warning when distillation moved the 8-step sample away from the teacher."""
        if not health <= self.threshold:
            return (f"turbo health {health:.2f} (the 8-step sample is {health:.2f}x as far from the teacher "
                    f"as without the distill LoRA, limit {self.threshold:g}): distillation is not helping: "
                    "stop here, lower optim.lr or check the SFT LoRA and teacher settings")
        return None
