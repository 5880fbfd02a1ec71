"""Schedules at exact values, the optimizers build_optimizer makes, Lion against its paper, and the EMA."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch

from trainer.config import ConfigError, OptimConfig
from trainer.optim import (
    Ema,
    Lion,
    build_optimizer,
    build_scheduler,
    constant,
    constant_with_warmup,
    cosine,
    cosine_with_restarts,
    linear,
    schedule_fn,
    step_decay,
    warmup,
)


def _cfg(**kw: object) -> OptimConfig:
    return dataclasses.replace(OptimConfig(), **kw)


# ---------------------------------------------------------------------------------------------- schedules


def test_warmup_never_starts_at_zero_and_peaks_at_warmup_steps() -> None:
    assert [warmup(i, 4) for i in range(6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert warmup(0, 0) == 1.0
    assert [constant_with_warmup(i, 3) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert constant(0) == constant(10**6) == 1.0


def test_linear() -> None:
    # warmup 2, then from 1 at step 2 down to 0.1 at step 12 (10 decay steps of 0.09), then flat.
    assert [linear(i, 2, 12, 0.1) for i in (0, 1, 2)] == [1 / 3, 2 / 3, 1.0]
    assert linear(7, 2, 12, 0.1) == pytest.approx(0.55, abs=1e-15)
    assert linear(12, 2, 12, 0.1) == pytest.approx(0.1, abs=1e-15)
    assert linear(100, 2, 12, 0.1) == pytest.approx(0.1, abs=1e-15)
    assert linear(5, 0, 10, 0.0) == 0.5


def test_cosine() -> None:
    assert cosine(0, 0, 100, 0.0) == 1.0
    assert cosine(50, 0, 100, 0.0) == pytest.approx(0.5, abs=1e-15)
    assert cosine(25, 0, 100, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), abs=1e-15)
    assert cosine(100, 0, 100, 0.2) == pytest.approx(0.2, abs=1e-15)
    assert cosine(60, 10, 110, 0.2) == pytest.approx(0.6, abs=1e-15)  # halfway after warmup: (1 + 0.2) / 2
    assert cosine(4, 10, 110, 0.2) == 5 / 11
    assert cosine(10_000, 10, 110, 0.2) == pytest.approx(0.2, abs=1e-15)


def test_cosine_with_restarts_really_restarts() -> None:
    # warmup 10, then 3 cycles of 30 steps: each cycle starts at exactly 1 and decays towards the floor.
    values = [cosine_with_restarts(i, 10, 100, 3, 0.1) for i in range(100)]
    assert [values[i] for i in (10, 40, 70)] == [1.0, 1.0, 1.0]
    assert values[25] == pytest.approx(0.55, abs=1e-15)  # middle of the first cycle
    assert values[55] == pytest.approx(0.55, abs=1e-15) and values[85] == pytest.approx(0.55, abs=1e-15)
    for start in (10, 40, 70):
        cycle = values[start : start + 30]
        assert all(a > b for a, b in zip(cycle, cycle[1:], strict=False)), "decreasing inside a cycle"
        assert cycle[-1] < 0.11
    assert values[9] == 10 / 11  # still warming up
    assert cosine_with_restarts(100, 10, 100, 3, 0.1) == 0.1
    # one cycle is plain cosine
    assert all(cosine_with_restarts(i, 5, 50, 1, 0.0) == cosine(i, 5, 50, 0.0) for i in range(50))


def test_step_decay() -> None:
    assert [step_decay(i, 0, 10, 0.5, 0.0) for i in (0, 9, 10, 19, 20, 35)] == [1, 1, 0.5, 0.5, 0.25, 0.125]
    assert step_decay(1, 2, 10, 0.5, 0.0) == 2 / 3
    assert step_decay(12, 2, 10, 0.5, 0.0) == 0.5
    assert step_decay(1000, 0, 10, 0.5, 0.3) == 0.3


def _lrs(
    scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, n: int
) -> list[float]:
    out = []
    for _ in range(n):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        _cfg(scheduler="constant"),
        _cfg(scheduler="constant_with_warmup", warmup_steps=3),
        _cfg(scheduler="linear", warmup_steps=2, steps=20, min_lr_ratio=0.1),
        _cfg(scheduler="cosine", warmup_steps=2, steps=20),
        _cfg(scheduler="cosine_with_restarts", warmup_steps=2, steps=20, restarts=3),
        _cfg(scheduler="step", step_size=4, gamma=0.5),
    ],
    ids=lambda c: c.scheduler,
)
def test_build_scheduler_applies_schedule_and_resumes(cfg: OptimConfig) -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    fn = schedule_fn(cfg)
    lrs = _lrs(sched, opt, 10)
    assert lrs == pytest.approx([cfg.lr * fn(i) for i in range(10)], rel=1e-12)
    # fresh objects built in the same order, then loaded from the state dicts, continue identically
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched2 = build_scheduler(opt2, cfg)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert _lrs(sched2, opt2, 10) == _lrs(sched, opt, 10)


def test_restarts_through_lambda_lr_return_to_peak() -> None:
    cfg = _cfg(scheduler="cosine_with_restarts", warmup_steps=4, steps=64, restarts=4, lr=2e-4)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    lrs = _lrs(build_scheduler(opt, cfg), opt, 64)
    assert [lrs[i] for i in (4, 19, 34, 49)] == [2e-4] * 4
    assert max(lrs[5:19]) < 2e-4


# ---------------------------------------------------------------------------------------------- optimizers


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]


def test_lion_matches_the_paper_update_rule() -> None:
    params = _params()
    ref = [p.detach().double().clone() for p in params]
    mom = [torch.zeros_like(r) for r in ref]
    lr, (b1, b2), wd = 1e-2, (0.9, 0.99), 0.1
    opt = Lion(params, lr=lr, betas=(b1, b2), weight_decay=wd)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):  # Algorithm 2 of Chen et al. 2023, in float64
            c = b1 * mom[i] + (1 - b1) * g.double()
            ref[i] = ref[i] - lr * (torch.sign(c) + wd * ref[i])
            mom[i] = b2 * mom[i] + (1 - b2) * g.double()
    for p, r in zip(params, ref, strict=True):
        torch.testing.assert_close(p.detach().double(), r, rtol=0, atol=1e-6)
    torch.testing.assert_close(opt.state[params[0]]["exp_avg"].double(), mom[0], rtol=0, atol=1e-6)


def test_lion_skips_params_without_grad_and_state_round_trips() -> None:
    params = _params()
    opt = Lion(params, lr=1e-3)
    params[0].grad = torch.ones(3, 4)
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1], before) and params[1] not in opt.state
    torch.testing.assert_close(params[0].detach(), _params()[0].detach() - 1e-3)
    opt2 = Lion(_params(), lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state[params[0]]["exp_avg"])


def test_build_adamw_uses_foreach_on_cpu() -> None:
    cfg = _cfg(lr=3e-4, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.05)
    opt = build_optimizer(_params(), cfg, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    d = opt.defaults
    assert (d["lr"], d["betas"], d["eps"], d["weight_decay"]) == (3e-4, (0.8, 0.9), 1e-6, 0.05)
    assert d["foreach"] is True and not d["fused"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_build_adamw_is_fused_on_cuda() -> None:
    params = [torch.nn.Parameter(torch.randn(3, device="cuda"))]
    assert build_optimizer(params, _cfg(), "cuda").defaults["fused"] is True


def test_build_lion_and_adafactor() -> None:
    lion = build_optimizer(_params(), _cfg(optimizer="lion", lr=1e-5, betas=(0.9, 0.99), weight_decay=0.1))
    assert isinstance(lion, Lion) and lion.defaults == {"lr": 1e-5, "betas": (0.9, 0.99), "weight_decay": 0.1}
    ada = build_optimizer(_params(), _cfg(optimizer="adafactor", lr=2e-4))
    assert type(ada).__name__ == "Adafactor"
    assert ada.defaults["lr"] == 2e-4 and ada.defaults["relative_step"] is False
    assert ada.defaults["scale_parameter"] is False
    params = ada.param_groups[0]["params"]
    params[0].grad = torch.ones_like(params[0])
    before = params[0].detach().clone()
    ada.step()
    # Adafactor's first update is sign-like with RMS clipped to 1: every entry moves by about lr
    assert (before - params[0].detach()).abs().mean() == pytest.approx(2e-4, rel=0.05)


def test_build_accepts_param_groups_and_refuses_empty() -> None:
    p = _params()
    opt = build_optimizer([{"params": [p[0]]}, {"params": [p[1]], "lr": 1e-3}], _cfg())
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-3]
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([], _cfg())


_OPTIONAL = [("adamw8bit", "bitsandbytes", "bitsandbytes"), ("prodigy", "prodigyopt", "prodigyopt")]


@pytest.mark.parametrize(("optimizer", "module", "package"), _OPTIONAL)
def test_missing_optional_optimizer_names_the_package(optimizer: str, module: str, package: str) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed")
    with pytest.raises(ConfigError, match=f"needs the {package} package: pip install {package}"):
        build_optimizer(_params(), _cfg(optimizer=optimizer, lr=1.0))


# ---------------------------------------------------------------------------------------------- EMA


def _train(params: list[torch.nn.Parameter], ema: Ema, steps: int) -> list[list[torch.Tensor]]:
    """A few SGD steps with an EMA update after each; returns the parameter values after each step."""
    opt = torch.optim.SGD(params, lr=0.1)
    history = []
    for step in range(steps):
        loss = sum(((p - step) ** 2).sum() for p in params)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(step)
        history.append([p.detach().clone() for p in params])
    return history


@pytest.mark.parametrize("use_warmup", [True, False])
def test_ema_matches_hand_computed_average(use_warmup: bool) -> None:
    params = _params()
    initial = [p.detach().double().clone() for p in params]
    ema = Ema(params, decay=0.9, warmup=use_warmup)
    history = _train(params, ema, 6)
    expected = initial
    for step, values in enumerate(history):
        d = min(0.9, (1 + step) / (10 + step)) if use_warmup else 0.9
        expected = [d * e + (1 - d) * v.double() for e, v in zip(expected, values, strict=True)]
    for s, e in zip(ema.shadow, expected, strict=True):
        assert s.dtype == torch.float32
        torch.testing.assert_close(s.double(), e, rtol=1e-6, atol=1e-6)
    assert [ema.decay_at(i) for i in (0, 1, 80, 10**6)] == (
        [0.1, 2 / 11, 0.9, 0.9] if use_warmup else [0.9, 0.9, 0.9, 0.9]
    )


def test_ema_swapped_holds_ema_weights_and_restores_bitwise() -> None:
    params = [torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16)), torch.nn.Parameter(torch.randn(7))]
    ema = Ema(params, decay=0.99)
    _train(params, ema, 3)
    raw = [p.detach().clone() for p in params]
    assert not any(torch.equal(s.to(r.dtype), r) for s, r in zip(ema.shadow, raw, strict=True))
    with ema.swapped():
        for p, s in zip(params, ema.shadow, strict=True):
            assert torch.equal(p.detach(), s.to(p.dtype))
    for p, r in zip(params, raw, strict=True):
        assert torch.equal(p.detach(), r) and p.dtype == r.dtype
    with pytest.raises(RuntimeError, match="boom"), ema.swapped(params):
        raise RuntimeError("boom")
    assert all(torch.equal(p.detach(), r) for p, r in zip(params, raw, strict=True))
    with pytest.raises(ValueError, match="do not match"), ema.swapped(params[:1]):
        pass


def test_ema_state_dict_round_trip() -> None:
    params = _params()
    ema = Ema(params, decay=0.95)
    _train(params, ema, 3)
    other = Ema(_params(), decay=0.5, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.95 and other.warmup is True
    assert all(torch.equal(a, b) for a, b in zip(other.shadow, ema.shadow, strict=True))
    with pytest.raises(ValueError, match="does not match"):
        Ema([torch.nn.Parameter(torch.zeros(2))]).load_state_dict(ema.state_dict())
