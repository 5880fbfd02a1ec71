"""Train the tiny VAE that `python -m trainer demo` and `trainer.tiny.tiny_vae(0)` use, and write it as
trainer/assets/tiny_vae.safetensors (fp16, ~1 MB).

The model is a real diffusers AutoencoderKL with trainer.tiny.TINY_VAE's config (the Flux VAE's structure:
16 latent channels, 8x down, scale 0.3611 / shift 0.1159) at toy widths. It learns on procedural pictures:
half are the demo's own images (a red circle on a plain background, as trainer.demo.make_dataset draws
them), the rest random scenes (flat or gradient backgrounds, 1-4 ellipses, rectangles and triangles in
random colours) so that red circles are nothing special to the decoder: an untrained transformer's samples
decode to coloured blobs, not to the demo's concept.

Loss: L1 + MSE on pixels of the decoded latent mean, with the latent jittered by N(0, 0.05) in ZIT units
(after the first quarter of the steps) so the decoder is smooth around the data; the ZIT latent
z = (mean - shift) * scale is pushed to zero mean and unit std per channel (what the flow-matching sampler
starts from), and the posterior's log-variance to a small constant. Steps run on 64x64 crops, the last
quarter on whole 128x128 pictures. One CPU thread (the model is too small to gain from more): the shipped
file took 3000 steps, about an hour on a shared 2-core machine. It prints the L1 error on held-out
pictures (0.034 for the shipped file; the demo's own pictures: 0.015).

TINY_VAE differs from the Flux VAE in one setting besides its widths: 8 GroupNorm groups (4 channels each,
as at the Flux VAE's first level) instead of 32. With 32 groups of one channel each, every norm
standardises each channel per picture, so a flat colour cannot pass through and the model cannot learn to
reconstruct.

Run: python scripts/train_tiny_vae.py [--steps 3000] [--out trainer/assets/tiny_vae.safetensors]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from trainer.demo import BACKGROUNDS, CIRCLE_RED  # noqa: E402
from trainer.tiny import TINY_VAE, TINY_VAE_FILE  # noqa: E402

SIZE = 128
JITTER = 0.05  # latent noise in ZIT units during training (from the second quarter on)
LOGVAR = -8.0  # target posterior log-variance (raw latent units): sampling ~ the mode


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 255) for _ in range(3))


def demo_picture(rng: random.Random, size: int = SIZE) -> Image.Image:
    """A picture like the demo's: one red circle on one of its plain backgrounds (random radius/place)."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[rng.choice(list(BACKGROUNDS))])
    r = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=CIRCLE_RED)
    return image


def random_scene(rng: random.Random, size: int = SIZE) -> Image.Image:
    """A flat or two-colour gradient background with 1-4 random shapes in random colours."""
    if rng.random() < 0.7:
        image = Image.new("RGB", (size, size), _colour(rng))
    else:
        a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
        t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        ramp = np.broadcast_to(a + t * (b - a), (size, size, 3))
        ramp = ramp if rng.random() < 0.5 else ramp.transpose(1, 0, 2)
        image = Image.fromarray(np.ascontiguousarray(ramp).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        kind, fill = rng.choice(("ellipse", "rectangle", "triangle")), _colour(rng)
        x0, y0 = rng.randint(-size // 4, size - 8), rng.randint(-size // 4, size - 8)
        x1, y1 = x0 + rng.randint(8, size // 2), y0 + rng.randint(8, size // 2)
        if kind == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), (rng.randint(x0, x1), y0)], fill=fill)
    return image


def batch(rng: random.Random, n: int, crop: int) -> torch.Tensor:
    """n pictures in [-1, 1] (n, 3, crop, crop): half demo-like, half random scenes, random crops."""
    out = []
    for _ in range(n):
        image = demo_picture(rng) if rng.random() < 1 / 2 else random_scene(rng)
        x, y = rng.randint(0, SIZE - crop), rng.randint(0, SIZE - crop)
        out.append(np.asarray(image.crop((x, y, x + crop, y + crop)), np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) / 127.5 - 1


def vae_loss(model: AutoencoderKL, x: torch.Tensor, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, L1 reconstruction error) of one batch, the latent jittered by N(0, jitter)."""
    scale, shift = model.config.scaling_factor, model.config.shift_factor
    dist = model.encode(x).latent_dist
    z = (dist.mean - shift) * scale
    y = model.decode((z + jitter * torch.randn_like(z)) / scale + shift).sample
    l1 = (y - x).abs().mean()
    stats = (z.mean(dim=(0, 2, 3)) ** 2 + (z.std(dim=(0, 2, 3)) - 1) ** 2).mean()
    return l1 + F.mse_loss(y, x) + 0.1 * stats + 1e-4 * ((dist.logvar - LOGVAR) ** 2).mean(), l1


def save(model: AutoencoderKL, path: str, steps: int) -> None:
    """Write the weights as fp16 safetensors."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, path,
              metadata={"format": "pt", "trained_by": "scripts/train_tiny_vae.py", "steps": str(steps)})


def train(steps: int, batch_size: int, lr: float, seed: int, out: str) -> AutoencoderKL:
    """The trained AutoencoderKL (TINY_VAE config, float32, eval), saved to `out` every 500 steps."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoencoderKL.from_config(TINY_VAE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    t0, recent = time.perf_counter(), []
    for step in range(steps):
        full = step >= steps * 3 // 4
        jitter = JITTER * min(1.0, max(0.0, 4 * step / steps - 1))  # none in the first quarter, full at half
        x = batch(rng, batch_size // 2 if full else batch_size, SIZE if full else 64)
        loss, l1 = vae_loss(model, x, jitter)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [l1.item()])[-50:]
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  L1 {sum(recent) / len(recent):.4f}  {time.perf_counter() - t0:.0f} s",
                  flush=True)
        if step % 500 == 499:
            save(model, out, step + 1)
    return model.eval()


def main() -> None:
    """Parse the arguments, train, report the error on the demo's images and write the fp16 file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(TINY_VAE_FILE))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = train(args.steps, args.batch, args.lr, args.seed, args.out)
    with torch.no_grad():
        x = batch(random.Random(12345), 16, SIZE)
        dist = model.encode(x).latent_dist
        err = (model.decode(dist.mode()).sample.clamp(-1, 1) - x).abs().mean().item()
        z = (dist.mode() - model.config.shift_factor) * model.config.scaling_factor
    print(f"held-out L1 {err:.4f} (of a [-1, 1] range); latent mean {z.mean():.3f} std {z.std():.3f}")
    save(model, args.out, args.steps)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
