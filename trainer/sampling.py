"""Preview sampling: ZIT's Euler flow-matching sampler (turbo 8 steps cfg 1; de-turbo ~30 steps cfg ~2)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .model import predict_velocity
from .objective import inference_sigmas
from .sheets import labelled_grid

LATENT_CHANNELS = 16
VAE_FACTOR = 8


@dataclass(frozen=True)
class SamplerSettings:
    """How one preview row is sampled."""

    label: str
    steps: int
    cfg: float
    shift: float = 3.0


TURBO = SamplerSettings("turbo 8 steps cfg 1", 8, 1.0)


def initial_noise(seed: int, width: int, height: int, channels: int = LATENT_CHANNELS) -> torch.Tensor:
    """The (C, H/8, W/8) starting noise of a seed, drawn on the CPU so every device gets the same image."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(channels, height // VAE_FACTOR, width // VAE_FACTOR, generator=gen)


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    embeds: Sequence[torch.Tensor],
    negative: torch.Tensor,
    seeds: Sequence[int],
    width: int,
    height: int,
    settings: SamplerSettings = TURBO,
) -> torch.Tensor:
    """Euler steps x += (s_next - s) * v from noise (s = 1) to s = 0; CFG against `negative` if cfg != 1."""
    device = next(model.parameters()).device
    x = torch.stack([initial_noise(s, width, height) for s in seeds]).to(device)
    sigmas = inference_sigmas(settings.steps, settings.shift).tolist()
    embeds = [e.to(device) for e in embeds]
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        sig = torch.full((len(seeds),), s, device=device)
        v = predict_velocity(model, x, sig, embeds)
        if settings.cfg != 1.0:
            v_neg = predict_velocity(model, x, sig, [negative.to(device)] * len(seeds))
            v = v_neg + settings.cfg * (v - v_neg)
        x = x + (s_next - s) * v
    return x


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B,3,H,W) images in [-1,1] -> PIL RGB images."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    return [Image.fromarray(p.numpy(), "RGB") for p in pixels]


def grid(rows: Sequence[Sequence[Image.Image]], pad: int = 2, *, title: str = "",
         row_labels: Sequence[str] = (), col_labels: Sequence[str] = ()) -> Image.Image:
    """Paste rows of equal-size images into one picture (rows: e.g. sampler settings; columns: prompts),
    labelled with `title`, `row_labels` and `col_labels` when given (see trainer.sheets)."""
    return labelled_grid(rows, title=title, row_labels=row_labels, col_labels=col_labels, pad=pad)


def preview_rows(p: Any, distilled: bool = True) -> list[SamplerSettings]:
    """The sampler rows of a preview config: turbo (a distilled model only), plus de-turbo when `p.deturbo`
    is on or the model is not distilled."""
    rows = [SamplerSettings(f"turbo {p.turbo_steps} steps cfg 1", p.turbo_steps, 1.0)] if distilled else []
    if p.deturbo or not distilled:
        label = f"de-turbo {p.deturbo_steps} steps cfg {p.deturbo_cfg:g}"
        rows.append(SamplerSettings(label, p.deturbo_steps, p.deturbo_cfg))
    return rows


@torch.no_grad()
def preview_grid(rows: Sequence[tuple[torch.nn.Module, SamplerSettings]], vae: Any,
                 embeds: Sequence[torch.Tensor], empty: torch.Tensor, seeds: Sequence[int], width: int,
                 height: int, *, title: str = "", prompts: Sequence[str] = ()) -> Image.Image:
    """One row of decoded samples per (model, sampler setting), one column per prompt and seed; with
    `prompts` the sheet is labelled: `title` on top, the prompts above the columns, each row's settings."""
    dtype = next(vae.model.parameters()).dtype
    images = [to_pil(vae.decode(sample_latents(model, embeds, empty, seeds, width, height, r).to(dtype)))
              for model, r in rows]
    if not prompts:
        return grid(images, title=title)
    return grid(images, title=title, row_labels=[r.label for _, r in rows], col_labels=prompts)
