"""The loss of one micro-batch of image latents: flow matching, optionally with differential guidance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from .model import predict_velocity
from .objective import (
    add_noise,
    differential_guidance_target,
    flow_loss,
    loss_weights,
    sample_sigmas,
    velocity_target,
)


def flow_matching_loss(model: nn.Module, latents: torch.Tensor, text_embeds: Sequence[torch.Tensor],
                       o: Any, generator: torch.Generator, device: torch.device, dg_scale: float,
                       autocast: Callable[[], AbstractContextManager],
                       lora_off: Callable[[], AbstractContextManager], rows: slice | None = None,
                       global_batch: int | None = None) -> torch.Tensor:
    """Noise the latents at sigmas drawn by the objective config `o`, predict the velocity and compare it
    with noise - x0; with `dg_scale` the target moves away from the prediction with the trained LoRA off
    (`lora_off()`): v + g (v - v_base). In a multi-process run the noise and sigmas are drawn for the
    whole `global_batch` and these latents are its `rows`."""
    x0 = latents.to(device, torch.float32)
    n = global_batch or x0.shape[0]
    rows = rows or slice(0, n)
    noise = torch.randn((n, *x0.shape[1:]), generator=generator)[rows].to(device)
    sigmas = sample_sigmas(o.timesteps, n, generator, shift=o.shift, mean=o.logit_mean,
                           std=o.logit_std, jitter=o.turbo_jitter)[rows].to(device)
    noisy, target = add_noise(x0, noise, sigmas), velocity_target(x0, noise)
    embeds = [e.to(device) for e in text_embeds]
    with autocast():
        if dg_scale:
            with torch.no_grad(), lora_off():
                base = predict_velocity(model, noisy, sigmas, embeds)
            target = differential_guidance_target(target, base, dg_scale)
        pred = predict_velocity(model, noisy, sigmas, embeds)
    weights = loss_weights(o.weighting, sigmas.cpu()).to(device)
    return flow_loss(pred, target, weights, kind=o.loss, huber_delta=o.huber_delta)
