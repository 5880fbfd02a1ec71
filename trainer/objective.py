"""The flow-matching objective in sigma space: timestep samplers, noising, loss weights, losses, guidance.

Conventions (those of every Z-Image trainer): ``noisy = (1 - s) * x0 + s * noise`` and the regression target
is the velocity ``noise - x0``; s = 1 is pure noise, s = 0 the clean latent. The model's own time convention
(t = 1 - s, negated output) lives in trainer/model/transformer.py; everything here works in sigma space.

Every sampler takes a ``torch.Generator`` (on the CPU) and returns float32 sigmas of shape (batch,) that
lie strictly inside (0, 1): at s = 0 the target would be trivially the input and s = 1 is never seen by
an 8-step sampler after its first step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

SIGMA_EPS = 1e-4
"""Sampled sigmas are clamped to [SIGMA_EPS, 1 - SIGMA_EPS]."""

TURBO_SHIFT = 3.0
TURBO_STEPS = 8


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Apply the static time shift ``s' = shift * s / (1 + (shift - 1) * s)`` (FlowMatchEuler, SD3)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def inference_sigmas(steps: int, shift: float = TURBO_SHIFT) -> torch.Tensor:
    """The ``steps + 1`` sigmas of a shifted FlowMatchEuler schedule, from 1.0 down to a final 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    uniform = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return shift_sigma(uniform, shift).float()


TURBO_SIGMAS: tuple[float, ...] = tuple(inference_sigmas(TURBO_STEPS, TURBO_SHIFT)[:-1].tolist())
"""ZIT's 8 inference sigmas: 1.0, .9545, .9, .8333, .75, .6429, .5, .3 (shift 3 of 8 uniform steps)."""


def _clamp(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas.clamp(SIGMA_EPS, 1.0 - SIGMA_EPS).float()


def sample_uniform(batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sigmas uniform on (0, 1) (ai-toolkit's "weighted" sampling draws its timesteps this way)."""
    return _clamp(torch.rand(batch, generator=generator, dtype=torch.float64))


def sample_shifted(
    batch: int, shift: float = TURBO_SHIFT, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform sigmas pushed towards noise by the static shift (shift 3 = ZIT's schedule, musubi uses 2)."""
    uniform = torch.rand(batch, generator=generator, dtype=torch.float64)
    return _clamp(shift_sigma(uniform, shift))


def sample_logit_normal(
    batch: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sigmas ``sigmoid(N(mean, std))`` (SD3's logit-normal density; mean > 0 favours noise)."""
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    normal = torch.randn(batch, generator=generator, dtype=torch.float64)
    return _clamp(torch.sigmoid(mean + std * normal))


def sample_turbo_anchored(
    batch: int,
    jitter: float = 0.02,
    generator: torch.Generator | None = None,
    anchors: Sequence[float] = TURBO_SIGMAS,
) -> torch.Tensor:
    """Sigmas near the turbo inference sigmas: a uniformly chosen anchor plus uniform jitter in +-jitter."""
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    table = torch.tensor(list(anchors), dtype=torch.float64)
    index = torch.randint(len(table), (batch,), generator=generator)
    offset = (torch.rand(batch, generator=generator, dtype=torch.float64) * 2 - 1) * jitter
    return _clamp(table[index] + offset)


TIMESTEP_SAMPLERS = ("uniform", "shift", "logit_normal", "turbo")
"""Names accepted by ``sample_sigmas`` (the config's ``objective.timesteps`` choices)."""


def sample_sigmas(
    kind: str,
    batch: int,
    generator: torch.Generator | None = None,
    *,
    shift: float = TURBO_SHIFT,
    mean: float = 0.0,
    std: float = 1.0,
    jitter: float = 0.02,
) -> torch.Tensor:
    """Draw sigmas with the sampler named ``kind`` (one of TIMESTEP_SAMPLERS), ignoring unused options."""
    if kind == "uniform":
        return sample_uniform(batch, generator)
    if kind == "shift":
        return sample_shifted(batch, shift, generator)
    if kind == "logit_normal":
        return sample_logit_normal(batch, mean, std, generator)
    if kind == "turbo":
        return sample_turbo_anchored(batch, jitter, generator)
    raise ValueError(f"unknown timestep sampler {kind!r}; choose one of {', '.join(TIMESTEP_SAMPLERS)}")


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View (B,) sigmas as (B, 1, 1, ...) to broadcast against ``like``, in its dtype and device."""
    return sigma.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The noisy latent ``(1 - s) * x0 + s * noise`` for per-sample sigmas (B,)."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target ``noise - x0``."""
    return noise - x0


def x0_from_velocity(noisy: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The clean latent implied by a velocity: ``x0 = noisy - s * v``."""
    return noisy - _per_sample(sigma, noisy) * velocity


def weight_none(sigma: torch.Tensor) -> torch.Tensor:
    """Unit weights: the plain velocity MSE (diffusers, ai-toolkit without weighting)."""
    return torch.ones_like(sigma, dtype=torch.float32)


def weight_sigma_sqr(sigma: torch.Tensor) -> torch.Tensor:
    """``s^2``: velocity MSE times s^2 equals the MSE on the predicted x0 (ComfyUI's built-in trainer).

    Since ``x0_pred - x0 = -s * (v_pred - v)``, this weighting trains on clean-image error and all but
    ignores the noisiest steps, where ZIT's composition is decided.
    """
    return sigma.float() ** 2


def _bump(sigma: torch.Tensor) -> torch.Tensor:
    return torch.exp(-2.0 * (sigma - 0.5) ** 2)


def weight_gaussian_bump(sigma: torch.Tensor, shift: float = TURBO_SHIFT) -> torch.Tensor:
    """DiffSynth's training weight: a Gaussian bump ``exp(-2 (t/1000 - 0.5)^2)`` peaking at t = 500.

    As in DiffSynth-Studio's FlowMatchScheduler: the bump's minimum over their 1000-step training grid
    (shifted sigmas ``shift(1 - i/1000)``) is subtracted, so the weight is 0 at pure noise, and it is
    normalised to mean 1 over that grid, so under shift-``shift`` sampling the average weight is 1.
    Peak at s = 0.5 is about 2.
    """
    grid = shift_sigma(1.0 - torch.arange(1000, dtype=torch.float64) / 1000, shift)
    floor = _bump(grid).min()
    scale = (_bump(grid) - floor).mean()
    return ((_bump(sigma.double()) - floor) / scale).clamp_min(0.0).float()


LOSS_WEIGHTINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": weight_none,
    "sigma_sqr": weight_sigma_sqr,
    "gaussian_bump": weight_gaussian_bump,
}


def loss_weights(kind: str, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights (B,) for the weighting named ``kind`` (a key of LOSS_WEIGHTINGS)."""
    if kind not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {kind!r}; choose one of {', '.join(LOSS_WEIGHTINGS)}")
    return LOSS_WEIGHTINGS[kind](sigma)


def _mean_per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1).mean(dim=1)


def mse_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample (B,), computed in float32."""
    return _mean_per_sample((pred.float() - target.float()) ** 2)


def huber_per_sample(pred: torch.Tensor, target: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """Huber error per sample (B,), scaled to equal the squared error r^2 for |r| <= delta.

    ``2 * huber(r, delta)``: r^2 inside delta, ``2 * delta * |r| - delta^2`` outside, so small residuals
    are trained exactly as with MSE while outliers pull with a bounded gradient ``2 * delta``.
    """
    if delta <= 0:
        raise ValueError(f"huber delta must be > 0, got {delta}")
    elementwise = F.huber_loss(pred.float(), target.float(), reduction="none", delta=delta)
    return _mean_per_sample(2.0 * elementwise)


LOSS_KINDS = ("mse", "huber")


def flow_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    kind: str = "mse",
    huber_delta: float = 1.0,
) -> torch.Tensor:
    """Scalar loss: per-sample MSE or Huber, times per-sample weights (B,), mean over the batch."""
    if kind == "mse":
        per_sample = mse_per_sample(pred, target)
    elif kind == "huber":
        per_sample = huber_per_sample(pred, target, huber_delta)
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSS_KINDS)}")
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, torch.float32)
    return per_sample.mean()


def differential_guidance_target(target: torch.Tensor, base_pred: torch.Tensor, scale: float) -> torch.Tensor:
    """Extrapolate the target away from the frozen base model: ``target + scale * (target - base_pred)``.

    ``base_pred`` is the prediction of the base model with the LoRA switched off, on the same noisy
    input; it is detached here. The LoRA is thus pushed past the data target in the direction in which
    the base model is wrong, and the pull keeps its strength after the LoRA has moved off the base: the
    residual ``pred - target'`` does not vanish at ``pred = target``. At initialisation (LoRA B = 0,
    pred = base_pred) the gradient is the plain one times (1 + scale); the direction changes as soon as
    the LoRA prediction differs from the base one. scale 0 gives the plain target.

    Contrast ai-toolkit's "differential guidance": ``target' = pred + s * (target - pred)`` with
    ``pred`` the trained model's *own* detached prediction. Its MSE gradient is
    ``2 * (pred - target') = 2 * s * (pred - target)``: the plain gradient times s, so the update
    direction is unchanged and Adam-type optimizers, being invariant to a gradient scale, cancel it.
    """
    if scale == 0:
        return target
    base = base_pred.detach().to(target.dtype)
    return target + scale * (target - base)
