"""Tests of the flow-matching objective: samplers, schedule, noising algebra, weights, losses, guidance."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer import objective as obj


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- schedule ---------------------------------------------------------------------------------------


def test_turbo_sigmas_are_shift3_of_eight_uniform_steps() -> None:
    published = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3]
    assert len(obj.TURBO_SIGMAS) == 8
    for i, (ours, theirs) in enumerate(zip(obj.TURBO_SIGMAS, published, strict=True)):
        s = 1 - i / 8
        assert ours == pytest.approx(3 * s / (1 + 2 * s), abs=1e-6)
        assert ours == pytest.approx(theirs, abs=5e-5)


def test_inference_sigmas_end_with_zero_and_decrease() -> None:
    sigmas = obj.inference_sigmas(8)
    assert sigmas.shape == (9,)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.all(sigmas[:-1] > sigmas[1:])
    assert torch.allclose(sigmas[:-1], torch.tensor(obj.TURBO_SIGMAS))
    assert torch.allclose(obj.inference_sigmas(4, shift=1.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_shift_sigma_identity_at_one_and_bad_shift() -> None:
    s = torch.linspace(0, 1, 11)
    assert torch.allclose(obj.shift_sigma(s, 1.0), s)
    assert obj.shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shift"):
        obj.shift_sigma(0.5, 0.0)
    with pytest.raises(ValueError, match="steps"):
        obj.inference_sigmas(0)


# ---- samplers -------------------------------------------------------------------------------------------

N = 20000


@pytest.mark.parametrize("kind", obj.TIMESTEP_SAMPLERS)
def test_samplers_in_open_interval_seeded_and_float32(kind: str) -> None:
    a = obj.sample_sigmas(kind, N, gen(1))
    b = obj.sample_sigmas(kind, N, gen(1))
    c = obj.sample_sigmas(kind, N, gen(2))
    assert a.shape == (N,) and a.dtype == torch.float32
    assert torch.all(a > 0) and torch.all(a < 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_uniform_mean_and_spread() -> None:
    s = obj.sample_uniform(N, gen())
    assert s.mean().item() == pytest.approx(0.5, abs=0.01)
    assert s.var().item() == pytest.approx(1 / 12, abs=0.005)


def test_shifted_matches_formula_and_mean() -> None:
    u = torch.rand(N, generator=gen(3), dtype=torch.float64)
    s = obj.sample_shifted(N, 3.0, gen(3))
    assert torch.allclose(s, obj.shift_sigma(u, 3.0).float().clamp(obj.SIGMA_EPS, 1 - obj.SIGMA_EPS))
    # E[3u / (1 + 2u)] for u ~ U(0,1) = 3/2 - 3 ln(3) / 4
    assert s.mean().item() == pytest.approx(1.5 - 0.75 * math.log(3), abs=0.01)


def test_logit_normal_median_and_mean_shift() -> None:
    s = obj.sample_logit_normal(N, 0.0, 1.0, gen())
    assert s.median().item() == pytest.approx(0.5, abs=0.02)
    assert s.mean().item() == pytest.approx(0.5, abs=0.01)
    logits = torch.logit(obj.sample_logit_normal(N, 1.0, 0.5, gen()).double())
    assert logits.mean().item() == pytest.approx(1.0, abs=0.02)
    assert logits.std().item() == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="std"):
        obj.sample_logit_normal(4, 0.0, 0.0)


def test_turbo_anchored_stays_near_anchors_and_covers_them() -> None:
    s = obj.sample_turbo_anchored(N, 0.02, gen())
    anchors = torch.tensor(obj.TURBO_SIGMAS)
    distance, nearest = (s[:, None] - anchors[None, :]).abs().min(dim=1)
    assert torch.all(distance <= 0.02 + 1e-6)
    counts = torch.bincount(nearest, minlength=8).float()
    assert torch.all((counts / N - 1 / 8).abs() < 0.02)
    assert s.max() < 1.0
    exact = obj.sample_turbo_anchored(64, 0.0, gen())
    clamped = anchors.clamp(max=1 - obj.SIGMA_EPS)
    assert torch.all((exact[:, None] - clamped[None, :]).abs().min(dim=1).values < 1e-6)


def test_unknown_sampler_named() -> None:
    with pytest.raises(ValueError, match="cosmic"):
        obj.sample_sigmas("cosmic", 2)


# ---- noising algebra -------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.001, 0.999), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
def test_x0_recoverable_from_noisy_and_velocity(sigmas: list[float], seed: int) -> None:
    g = gen(seed)
    b = len(sigmas)
    x0 = torch.randn(b, 4, 3, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(b, 4, 3, 5, generator=g, dtype=torch.float64)
    s = torch.tensor(sigmas, dtype=torch.float64)
    noisy = obj.add_noise(x0, noise, s)
    v = obj.velocity_target(x0, noise)
    assert torch.allclose(obj.x0_from_velocity(noisy, v, s), x0, atol=1e-12)
    assert torch.allclose(noisy + (1 - s)[:, None, None, None] * v, noise, atol=1e-12)


def test_add_noise_endpoints() -> None:
    x0, noise = torch.ones(2, 3), torch.full((2, 3), -1.0)
    assert torch.equal(
        obj.add_noise(x0, noise, torch.tensor([0.0, 1.0])), torch.tensor([[1.0] * 3, [-1.0] * 3])
    )


# ---- loss weights -------------------------------------------------------------------------------------


def test_sigma_sqr_weight_equals_x0_space_mse() -> None:
    g = gen(4)
    x0, noise, v_pred = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    s = torch.tensor([0.2, 0.5, 0.9])
    noisy = obj.add_noise(x0, noise, s)
    x0_mse = obj.mse_per_sample(obj.x0_from_velocity(noisy, v_pred, s), x0)
    weighted = obj.mse_per_sample(v_pred, obj.velocity_target(x0, noise)) * obj.loss_weights("sigma_sqr", s)
    assert torch.allclose(x0_mse, weighted, rtol=1e-5)


def test_gaussian_bump_peak_zero_at_noise_mean_one_on_grid() -> None:
    grid = obj.shift_sigma(1.0 - torch.arange(1000, dtype=torch.float64) / 1000, 3.0)
    w = obj.weight_gaussian_bump(grid)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-4)
    assert obj.weight_gaussian_bump(torch.tensor([1.0])).item() == pytest.approx(0.0, abs=1e-6)
    curve = obj.weight_gaussian_bump(torch.linspace(0.01, 0.99, 99))
    assert curve.argmax().item() == 49  # s = 0.5, t = 500
    assert torch.all(curve >= 0)


def test_none_weights_and_unknown_weighting() -> None:
    assert torch.equal(obj.loss_weights("none", torch.tensor([0.1, 0.7])), torch.ones(2))
    with pytest.raises(ValueError, match="snr"):
        obj.loss_weights("snr", torch.tensor([0.5]))


# ---- losses ----------------------------------------------------------------------------------------------


def test_mse_weighted_mean_reduction() -> None:
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert obj.flow_loss(pred, target).item() == pytest.approx((1 + 4) / 2)
    assert obj.flow_loss(pred, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 2) / 2)


def test_huber_equals_mse_inside_delta_and_is_linear_outside() -> None:
    g = gen(5)
    pred = torch.randn(2, 3, 4, generator=g) * 0.1
    target = torch.zeros_like(pred)
    small = obj.flow_loss(pred, target, kind="huber", huber_delta=1.0)
    assert small.item() == pytest.approx(obj.flow_loss(pred, target).item(), rel=1e-6)
    big = torch.full((1, 1), 10.0)
    assert obj.flow_loss(big, torch.zeros(1, 1), kind="huber", huber_delta=1.0).item() == pytest.approx(19.0)
    assert obj.flow_loss(big, torch.zeros(1, 1)).item() == pytest.approx(100.0)


def test_huber_gradient_bounded_for_outliers() -> None:
    pred = torch.tensor([[0.1, 50.0]], requires_grad=True)
    obj.flow_loss(pred, torch.zeros(1, 2), kind="huber", huber_delta=0.5).backward()
    # d/dp of mean(2*huber): inside = 2 r / n, outside = 2 delta / n
    assert torch.allclose(pred.grad, torch.tensor([[0.1, 0.5]]))


def test_loss_errors_named() -> None:
    with pytest.raises(ValueError, match="l1"):
        obj.flow_loss(torch.zeros(1, 1), torch.zeros(1, 1), kind="l1")
    with pytest.raises(ValueError, match="delta"):
        obj.flow_loss(torch.zeros(1, 1), torch.zeros(1, 1), kind="huber", huber_delta=0.0)


# ---- differential guidance -----------------------------------------------------------------------------


def aitoolkit_guidance_target(target: torch.Tensor, pred: torch.Tensor, scale: float) -> torch.Tensor:
    """ai-toolkit's formulation: extrapolate from the trained model's own detached prediction."""
    pred = pred.detach()
    return pred + scale * (target - pred)


class TinyLora(torch.nn.Module):
    """A frozen linear base plus a trainable low-rank update, like a LoRA-wrapped layer."""

    def __init__(self, g: torch.Generator) -> None:
        super().__init__()
        self.base = torch.nn.Linear(6, 6)
        self.base.requires_grad_(False)
        self.a = torch.nn.Parameter(torch.randn(2, 6, generator=g) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(6, 2, generator=g) * 0.3)
        self.lora_on = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + x @ self.a.T @ self.b.T if self.lora_on else out


def grads(model: TinyLora, loss: torch.Tensor) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([model.a.grad.flatten(), model.b.grad.flatten()]).clone()


def setup_guidance() -> tuple[TinyLora, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = gen(6)
    torch.manual_seed(0)
    model = TinyLora(g)
    x = torch.randn(8, 6, generator=g)
    target = torch.randn(8, 6, generator=g)
    model.lora_on = False
    with torch.no_grad():
        base_pred = model(x)
    model.lora_on = True
    return model, x, target, base_pred


def test_aitoolkit_guidance_keeps_gradient_direction() -> None:
    model, x, target, _ = setup_guidance()
    plain = grads(model, obj.flow_loss(model(x), target))
    pred = model(x)
    guided = grads(model, obj.flow_loss(pred, aitoolkit_guidance_target(target, pred, 3.0)))
    assert torch.cosine_similarity(plain, guided, dim=0).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(guided, 3.0 * plain, rtol=1e-4, atol=1e-7)


def test_base_model_guidance_changes_gradient_direction() -> None:
    model, x, target, base_pred = setup_guidance()
    plain = grads(model, obj.flow_loss(model(x), target))
    guided_target = obj.differential_guidance_target(target, base_pred, 3.0)
    guided = grads(model, obj.flow_loss(model(x), guided_target))
    assert not (model(x) - base_pred).abs().max().item() < 1e-3  # the LoRA moved off the base
    assert torch.cosine_similarity(plain, guided, dim=0).item() < 0.999


def test_base_model_guidance_scale_zero_is_plain_and_base_detached() -> None:
    model, x, target, base_pred = setup_guidance()
    assert obj.differential_guidance_target(target, base_pred, 0.0) is target
    plain = grads(model, obj.flow_loss(model(x), target))
    same = grads(model, obj.flow_loss(model(x), obj.differential_guidance_target(target, base_pred, 0.0)))
    assert torch.equal(plain, same)
    live_base = model(x)
    guided = obj.differential_guidance_target(target, live_base, 1.0)
    assert not guided.requires_grad
    assert torch.allclose(guided, 2 * target - live_base.detach())
