"""Optimizers, learning-rate schedules and the EMA of the trained weights.

Schedules are pure functions of the 0-based optimizer step returning the lr multiplier; `build_scheduler`
wraps the one chosen in a torch LambdaLR. Warmup is linear and never starts at 0: step i < warmup gets
(i + 1) / (warmup + 1), so the first step already learns and step `warmup` is the first at the peak. The
decaying schedules reach min_lr_ratio at step `steps` (the step after the last one trained) and stay there.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from .config import ConfigError, OptimConfig

# ---------------------------------------------------------------------------------------------- schedules


def warmup(step: int, warmup_steps: int) -> float:
    """Linear warmup multiplier: (step + 1) / (warmup_steps + 1) before warmup_steps, then 1."""
    return (step + 1) / (warmup_steps + 1) if step < warmup_steps else 1.0


def _progress(step: int, warmup_steps: int, steps: int) -> float:
    """Fraction of the post-warmup span done at step, in [0, 1]."""
    return min(1.0, max(0, step - warmup_steps) / max(1, steps - warmup_steps))


def constant(step: int) -> float:
    """Always 1."""
    return 1.0


def constant_with_warmup(step: int, warmup_steps: int) -> float:
    """Linear warmup, then 1."""
    return warmup(step, warmup_steps)


def linear(step: int, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """Linear warmup, then linear decay from 1 to min_lr_ratio at `steps`."""
    if step < warmup_steps:
        return warmup(step, warmup_steps)
    return 1.0 - (1.0 - min_lr_ratio) * _progress(step, warmup_steps, steps)


def _half_cosine(fraction: float, min_lr_ratio: float) -> float:
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def cosine(step: int, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """Linear warmup, then a half cosine from 1 to min_lr_ratio at `steps`."""
    if step < warmup_steps:
        return warmup(step, warmup_steps)
    return _half_cosine(_progress(step, warmup_steps, steps), min_lr_ratio)


def cosine_with_restarts(
    step: int, warmup_steps: int, steps: int, restarts: int, min_lr_ratio: float
) -> float:
    """Linear warmup, then `restarts` half-cosine cycles over the remaining steps, each restarting at 1."""
    if step < warmup_steps:
        return warmup(step, warmup_steps)
    span = max(1, steps - warmup_steps)
    done = step - warmup_steps
    if done >= span:
        return min_lr_ratio
    return _half_cosine(
        (done * restarts % span) / span, min_lr_ratio
    )  # integer modulo: cycle starts are exact


def step_decay(step: int, warmup_steps: int, step_size: int, gamma: float, min_lr_ratio: float) -> float:
    """Linear warmup, then times gamma every step_size steps, never below min_lr_ratio."""
    if step < warmup_steps:
        return warmup(step, warmup_steps)
    return max(min_lr_ratio, gamma ** ((step - warmup_steps) // step_size))


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "constant_with_warmup": constant_with_warmup,
    "linear": linear,
    "cosine": cosine,
    "cosine_with_restarts": cosine_with_restarts,
    "step": step_decay,
}


def schedule_fn(cfg: OptimConfig) -> Callable[[int], float]:
    """The lr multiplier of cfg.scheduler as a function of the 0-based step (a picklable partial)."""
    span = {"warmup_steps": cfg.warmup_steps, "steps": cfg.steps, "min_lr_ratio": cfg.min_lr_ratio}
    kwargs: dict[str, dict[str, Any]] = {
        "constant": {},
        "constant_with_warmup": {"warmup_steps": cfg.warmup_steps},
        "linear": span,
        "cosine": span,
        "cosine_with_restarts": {**span, "restarts": cfg.restarts},
        "step": {
            "warmup_steps": cfg.warmup_steps,
            "step_size": cfg.step_size,
            "gamma": cfg.gamma,
            "min_lr_ratio": cfg.min_lr_ratio,
        },
    }
    if cfg.scheduler not in SCHEDULES:
        raise ConfigError("config", [f"optim.scheduler = {cfg.scheduler!r}: unknown scheduler"])
    return functools.partial(SCHEDULES[cfg.scheduler], **kwargs[cfg.scheduler])


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying schedule_fn(cfg) to every param group; call .step() after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_fn(cfg))


# ---------------------------------------------------------------------------------------------- optimizers


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2).

    c = b1 m + (1 - b1) g;  p <- p - lr (sign(c) + wd p);  m <- b2 m + (1 - b2) g.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or weight_decay < 0:
            raise ValueError(f"invalid Lion settings lr={lr}, betas={betas}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One Lion update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("Lion does not support sparse gradients")
        for p in params:
            if not self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        moms = [self.state[p]["exp_avg"] for p in params]
        update = torch._foreach_mul(moms, b1)
        torch._foreach_add_(update, grads, alpha=1 - b1)
        torch._foreach_sign_(update)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_add_(params, update, alpha=-lr)
        torch._foreach_mul_(moms, b2)
        torch._foreach_add_(moms, grads, alpha=1 - b2)


def _flat_params(params: Sequence[Any]) -> list[torch.Tensor]:
    """The tensors of a list of parameters or of param-group dicts."""
    out: list[torch.Tensor] = []
    for p in params:
        out.extend(p["params"] if isinstance(p, dict) else [p])
    return out


def _optional(module: str, package: str, optimizer: str) -> Any:
    """Import an optional optimizer package, or a ConfigError saying which pip package to install."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError(
            "config", [f'optim.optimizer = "{optimizer}" needs the {package} package: pip install {package}']
        ) from None


def _adamw(params: list[Any], cfg: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **kind
    )


def _adamw8bit(params: list[Any], cfg: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    bnb_optim = _optional("bitsandbytes.optim", "bitsandbytes", "adamw8bit")
    return bnb_optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _lion(params: list[Any], cfg: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    return Lion(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _prodigy(params: list[Any], cfg: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    prodigyopt = _optional("prodigyopt", "prodigyopt", "prodigy")
    return prodigyopt.Prodigy(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _adafactor(params: list[Any], cfg: OptimConfig, on_cuda: bool) -> torch.optim.Optimizer:
    optimization = _optional("transformers.optimization", "transformers", "adafactor")
    return optimization.Adafactor(
        params,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
    )


_OPTIMIZERS: dict[str, Callable[[list[Any], OptimConfig, bool], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "lion": _lion,
    "prodigy": _prodigy,
    "adafactor": _adafactor,
}


def build_optimizer(
    params: Iterable[Any], cfg: OptimConfig, device: torch.device | str | None = None
) -> torch.optim.Optimizer:
    """The optimizer cfg.optimizer over params (tensors or param-group dicts) that live on device.

    AdamW is fused on CUDA and foreach elsewhere; Adafactor uses the given lr as is (no relative step, no
    parameter scaling, no momentum). `device` defaults to the parameters' own device.
    """
    params = list(params)
    tensors = _flat_params(params)
    if not tensors:
        raise ValueError("build_optimizer: no trainable parameters")
    if cfg.optimizer not in _OPTIMIZERS:
        raise ConfigError("config", [f"optim.optimizer = {cfg.optimizer!r}: unknown optimizer"])
    dev = torch.device(device) if device is not None else tensors[0].device
    on_cuda = dev.type == "cuda" and all(t.is_cuda and t.is_floating_point() for t in tensors)
    return _OPTIMIZERS[cfg.optimizer](params, cfg, on_cuda)


# ---------------------------------------------------------------------------------------------- EMA


class Ema:
    """fp32 exponential moving average of a list of parameters.

    update(step) does shadow <- d * shadow + (1 - d) * param with d = decay, or, when warmup is on (the
    default), d = min(decay, (1 + step) / (10 + step)): the average follows the weights closely at first
    (d = 0.1 at step 0) so it is not dominated by the initial weights (a LoRA's B starts at zero).
    """

    def __init__(self, params: Iterable[torch.Tensor], decay: float = 0.999, warmup: bool = True) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.warmup = warmup
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]

    def decay_at(self, step: int) -> float:
        """The decay used by update(step)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current parameters into the average (call after optimizer step `step`, 0-based)."""
        d = self.decay_at(step)
        current = [p.detach().float() for p in self.params]
        torch._foreach_mul_(self.shadow, d)
        torch._foreach_add_(self.shadow, current, alpha=1 - d)

    def state_dict(self) -> dict[str, Any]:
        """Decay settings and the shadow tensors."""
        return {"decay": self.decay, "warmup": self.warmup, "shadow": [s.clone() for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned (shadow count and shapes must match)."""
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(
            a.shape != b.shape for a, b in zip(shadow, self.shadow, strict=True)
        ):
            raise ValueError("EMA state does not match the parameters (count or shapes differ)")
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])
        for mine, saved in zip(self.shadow, shadow, strict=True):
            mine.copy_(saved)

    @contextlib.contextmanager
    def swapped(self, params: Iterable[torch.Tensor] | None = None) -> Iterator[None]:
        """Temporarily hold the EMA weights in params (default: the tracked ones); restores them exactly."""
        targets = self.params if params is None else list(params)
        if len(targets) != len(self.shadow) or any(
            p.shape != s.shape for p, s in zip(targets, self.shadow, strict=True)
        ):
            raise ValueError("swapped: the params do not match the EMA tensors (count or shapes differ)")
        with torch.no_grad():
            backup = [p.detach().clone() for p in targets]
            for p, s in zip(targets, self.shadow, strict=True):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(targets, backup, strict=True):
                    p.copy_(b)
